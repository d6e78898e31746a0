//! The list of tasks a pool runs: each task with a unique key (its id), the
//! shard of one rank, and the completion records that let a rerun skip what
//! finished.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::path::Path;

use crate::pool::record::Records;
use crate::pool::Rank;
use crate::{Error, Result};

/// Tasks for [`Pool::execute`](crate::pool::Pool::execute), each with a
/// unique key.
///
/// A `Vec<T>` converts into `Tasks<T>` keyed by position (`"0"`, `"1"`, ...).
/// [`Tasks::keyed`] takes the keys from the tasks (a file name, a database
/// id): stable keys are what [`shard`](Tasks::shard) orders by and what
/// [`resume`](Tasks::resume) records.
///
/// ```
/// use sire::pool::{Rank, Tasks};
///
/// let files = ["b.txt", "a.txt", "c.txt", "d.txt", "e.txt"];
/// let tasks = Tasks::keyed(files, |f| f.to_string())?;
/// // Rank 0 of 2 takes the first 3 keys in order, rank 1 the other 2.
/// let mine = tasks.shard(Rank::new(0, 2)?);
/// assert_eq!(mine.keys().collect::<Vec<_>>(), ["a.txt", "b.txt", "c.txt"]);
/// # Ok::<(), sire::Error>(())
/// ```
#[derive(Debug)]
pub struct Tasks<T> {
    pub(crate) entries: Vec<(String, T)>,
    pub(crate) records: Option<Records>,
    skipped: usize,
}

impl<T> From<Vec<T>> for Tasks<T> {
    fn from(tasks: Vec<T>) -> Self {
        let entries = tasks.into_iter().enumerate().map(|(i, t)| (i.to_string(), t)).collect();
        Tasks { entries, records: None, skipped: 0 }
    }
}

impl<T> Tasks<T> {
    /// Tasks keyed by `key`, in the order given. Two tasks with one key are
    /// [`Error::DuplicateTask`].
    ///
    /// ```
    /// let e = sire::pool::Tasks::keyed(["x", "y", "x"], |t| t.to_string()).unwrap_err();
    /// assert!(e.to_string().contains("tasks #0 and #2 share the key `x`"), "{e}");
    /// ```
    pub fn keyed(tasks: impl IntoIterator<Item = T>, mut key: impl FnMut(&T) -> String) -> Result<Tasks<T>> {
        let entries: Vec<(String, T)> = tasks.into_iter().map(|t| (key(&t), t)).collect();
        let mut seen = HashMap::with_capacity(entries.len());
        for (i, (k, _)) in entries.iter().enumerate() {
            if let Some(first) = seen.insert(k.as_str(), i) {
                return Err(Error::DuplicateTask { key: k.clone(), first, second: i });
            }
        }
        Ok(Tasks { entries, records: None, skipped: 0 })
    }

    /// This rank's share: the tasks ordered by key (natural order: digit runs
    /// compare as numbers, so `img2` comes before `img10`), then the
    /// contiguous range [`Rank::range`] gives. Over ranks `0..world` every
    /// task is in exactly one shard, with no padding.
    ///
    /// ```
    /// use sire::pool::{Rank, Tasks};
    /// let tasks = Tasks::from((0..10).collect::<Vec<u32>>());
    /// let shard = tasks.shard(Rank::new(3, 4)?);
    /// assert_eq!(shard.keys().collect::<Vec<_>>(), ["8", "9"]);
    /// # Ok::<(), sire::Error>(())
    /// ```
    #[must_use]
    pub fn shard(mut self, rank: Rank) -> Tasks<T> {
        self.entries.sort_by(|a, b| natural_cmp(&a.0, &b.0));
        let range = rank.range(self.entries.len());
        self.entries.truncate(range.end);
        self.entries.drain(..range.start);
        self
    }

    /// Resumes a run: creates the results directory `dir` (0700) if needed,
    /// drops the tasks that have a completion record there, and has the pool
    /// write one (`<key>.done`, atomically, 0600) for each task that succeeds.
    /// A failed task gets none, so a rerun tries it again.
    ///
    /// A run killed half way loses at most the tasks that were running: a
    /// task whose function returned but whose record was not yet written runs
    /// again on the rerun.
    ///
    /// ```
    /// use sire::pool::Tasks;
    /// let dir = tempfile::tempdir()?;
    /// let tasks = Tasks::from(vec![1, 2, 3]).resume(dir.path())?;
    /// assert_eq!((tasks.len(), tasks.skipped()), (3, 0));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn resume(mut self, dir: impl AsRef<Path>) -> Result<Tasks<T>> {
        let records = Records::open(dir.as_ref())?;
        let before = self.entries.len();
        self.entries.retain(|(k, _)| !records.is_done(k));
        self.skipped += before - self.entries.len();
        self.records = Some(records);
        Ok(self)
    }

    /// Tasks to run.
    ///
    /// ```
    /// assert_eq!(sire::pool::Tasks::from(vec!['a', 'b']).len(), 2);
    /// ```
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there is nothing to run.
    ///
    /// ```
    /// assert!(sire::pool::Tasks::<u8>::from(vec![]).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Tasks left out by [`resume`](Tasks::resume) because an earlier run
    /// finished them.
    ///
    /// ```
    /// assert_eq!(sire::pool::Tasks::from(vec![1]).skipped(), 0);
    /// ```
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// The keys, in the order the tasks run and their outcomes are reported.
    ///
    /// ```
    /// let t = sire::pool::Tasks::from(vec!["x", "y"]);
    /// assert_eq!(t.keys().collect::<Vec<_>>(), ["0", "1"]);
    /// ```
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }
}

/// Natural order: runs of ASCII digits compare by value, everything else byte
/// by byte; equal values with different spellings (`01`, `1`) fall back to
/// byte order, so the order is total and consistent with equality.
pub(crate) fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (x, y) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < x.len() && j < y.len() {
        if x[i].is_ascii_digit() && y[j].is_ascii_digit() {
            let si = i;
            while i < x.len() && x[i].is_ascii_digit() {
                i += 1;
            }
            let sj = j;
            while j < y.len() && y[j].is_ascii_digit() {
                j += 1;
            }
            let (dx, dy) = (trim_zeros(&x[si..i]), trim_zeros(&y[sj..j]));
            let ord = dx.len().cmp(&dy.len()).then_with(|| dx.cmp(dy));
            if ord != Ordering::Equal {
                return ord;
            }
        } else {
            if x[i] != y[j] {
                return x[i].cmp(&y[j]);
            }
            i += 1;
            j += 1;
        }
    }
    (x.len() - i).cmp(&(y.len() - j)).then_with(|| x.cmp(y))
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let first = d.iter().position(|&c| c != b'0').unwrap_or(d.len());
    &d[first..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut keys = vec!["img10", "img2", "img1", "a", "img02", "10", "9", "b1c2", "b1c10", ""];
        keys.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(keys, ["", "9", "10", "a", "b1c2", "b1c10", "img1", "img02", "img2", "img10"]);
        assert_eq!(natural_cmp("x", "x"), Ordering::Equal);
        assert_ne!(natural_cmp("01", "1"), Ordering::Equal);
    }

    proptest::proptest! {
        /// `sort_by` needs a total order: antisymmetric, transitive, and
        /// `Equal` only for equal keys.
        #[test]
        fn natural_order_is_total(a in "[a0-2]{0,5}", b in "[a0-2]{0,5}", c in "[a0-2]{0,5}") {
            proptest::prop_assert_eq!(natural_cmp(&a, &b), natural_cmp(&b, &a).reverse());
            proptest::prop_assert_eq!(natural_cmp(&a, &b) == Ordering::Equal, a == b);
            if natural_cmp(&a, &b).is_le() && natural_cmp(&b, &c).is_le() {
                proptest::prop_assert!(natural_cmp(&a, &c).is_le(), "{a:?} <= {b:?} <= {c:?}");
            }
        }
    }

    #[test]
    fn index_keys_shard_in_index_order() {
        let t = Tasks::from((0..25).collect::<Vec<_>>()).shard(Rank::new(0, 2).unwrap());
        let got: Vec<i32> = t.entries.iter().map(|(_, v)| *v).collect();
        assert_eq!(got, (0..13).collect::<Vec<_>>());
    }
}
