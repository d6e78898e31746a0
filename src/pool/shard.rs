//! Ranks of a multi-process run: which contiguous share of the tasks this
//! process takes, from an explicit rank or the launcher's environment
//! (torchrun's `RANK`/`WORLD_SIZE`, Slurm's `SLURM_PROCID`/`SLURM_NTASKS`).

use std::ops::Range;

use crate::{Error, Result};

/// This process's place in a multi-process run: rank `rank` of `world`.
///
/// [`Tasks::shard`](crate::pool::Tasks::shard) gives each rank one contiguous
/// share of the tasks ordered by key; over all ranks, every task is taken
/// exactly once.
///
/// ```
/// use sire::pool::Rank;
///
/// let r = Rank::new(1, 4)?;
/// assert_eq!((r.rank(), r.world()), (1, 4));
/// // 10 tasks over 4 ranks: the first 10 % 4 = 2 ranks take one more.
/// assert_eq!(r.range(10), 3..6);
/// assert!(Rank::new(4, 4).is_err());
/// # Ok::<(), sire::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rank {
    rank: usize,
    world: usize,
}

impl Default for Rank {
    /// The only rank of a world of one.
    fn default() -> Self {
        Rank { rank: 0, world: 1 }
    }
}

impl Rank {
    /// Rank `rank` of a world of `world` processes; [`Error::InvalidRank`]
    /// unless `rank < world`.
    ///
    /// ```
    /// let e = sire::pool::Rank::new(2, 2).unwrap_err();
    /// assert!(e.to_string().contains("rank 2 is outside a world of 2"), "{e}");
    /// ```
    pub fn new(rank: usize, world: usize) -> Result<Rank> {
        check(rank, world, "given")
    }

    /// The rank the launcher gave this process: `RANK` and `WORLD_SIZE`
    /// (torchrun, `torch.distributed`), else `SLURM_PROCID` and `SLURM_NTASKS`
    /// (`srun`), else rank 0 of 1. A variable without its pair, a value that is
    /// not a number, or a rank outside the world is [`Error::InvalidRank`].
    ///
    /// ```
    /// // Under `srun -n 4` the third process gets rank 2 of 4; run alone, 0 of 1.
    /// let r = sire::pool::Rank::from_env()?;
    /// assert!(r.rank() < r.world());
    /// # Ok::<(), sire::Error>(())
    /// ```
    pub fn from_env() -> Result<Rank> {
        from_vars(|name| std::env::var(name).ok())
    }

    /// This process's rank, from 0.
    ///
    /// ```
    /// assert_eq!(sire::pool::Rank::default().rank(), 0);
    /// ```
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// How many processes share the tasks.
    ///
    /// ```
    /// assert_eq!(sire::pool::Rank::default().world(), 1);
    /// ```
    pub fn world(&self) -> usize {
        self.world
    }

    /// The positions this rank takes among `n` tasks ordered by key: one
    /// contiguous range, `n / world` long, one more for the first
    /// `n % world` ranks. The ranges of ranks `0..world` tile `0..n`.
    ///
    /// ```
    /// use sire::pool::Rank;
    /// let ranges: Vec<_> = (0..3).map(|r| Rank::new(r, 3).unwrap().range(7)).collect();
    /// assert_eq!(ranges, [0..3, 3..5, 5..7]);
    /// ```
    pub fn range(&self, n: usize) -> Range<usize> {
        let (base, extra) = (n / self.world, n % self.world);
        let start = self.rank * base + self.rank.min(extra);
        let len = base + usize::from(self.rank < extra);
        start..start + len
    }
}

fn check(rank: usize, world: usize, origin: &str) -> Result<Rank> {
    if world == 0 {
        return Err(Error::InvalidRank { origin: origin.into(), reason: "a world of 0 ranks".into() });
    }
    if rank >= world {
        return Err(Error::InvalidRank {
            origin: origin.into(),
            reason: format!("rank {rank} is outside a world of {world} (ranks 0..{world})"),
        });
    }
    Ok(Rank { rank, world })
}

/// [`Rank::from_env`] over any source of variables.
pub(crate) fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Rank> {
    for (r, w) in [("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")] {
        let origin = format!("{r}/{w}");
        match (var(r), var(w)) {
            (None, None) => continue,
            (Some(rank), Some(world)) => {
                let num = |name: &str, v: &str| {
                    v.trim().parse::<usize>().map_err(|_| Error::InvalidRank {
                        origin: origin.clone(),
                        reason: format!("{name}={v:?} is not a non-negative integer"),
                    })
                };
                return check(num(r, &rank)?, num(w, &world)?, &origin);
            }
            (Some(_), None) | (None, Some(_)) => {
                let (set, unset) = if var(r).is_some() { (r, w) } else { (w, r) };
                return Err(Error::InvalidRank {
                    origin,
                    reason: format!("{set} is set but {unset} is not"),
                });
            }
        }
    }
    Ok(Rank::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Rank> {
        let map: HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn launcher_variables_in_order() {
        assert_eq!(env(&[]).unwrap(), Rank::default());
        assert_eq!(env(&[("RANK", "3"), ("WORLD_SIZE", "8")]).unwrap(), Rank::new(3, 8).unwrap());
        assert_eq!(env(&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2")]).unwrap(), Rank::new(1, 2).unwrap());
        // torchrun's variables win over Slurm's (torchrun launched inside an allocation).
        let both = env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("SLURM_PROCID", "5"), ("SLURM_NTASKS", "6")]);
        assert_eq!(both.unwrap(), Rank::new(0, 2).unwrap());
    }

    #[test]
    fn bad_launcher_variables_are_errors() {
        let e = env(&[("RANK", "4"), ("WORLD_SIZE", "4")]).unwrap_err().to_string();
        assert!(e.contains("RANK/WORLD_SIZE") && e.contains("rank 4 is outside a world of 4"), "{e}");
        let e = env(&[("SLURM_PROCID", "x"), ("SLURM_NTASKS", "4")]).unwrap_err().to_string();
        assert!(e.contains("SLURM_PROCID=\"x\" is not a non-negative integer"), "{e}");
        let e = env(&[("RANK", "1")]).unwrap_err().to_string();
        assert!(e.contains("RANK is set but WORLD_SIZE is not"), "{e}");
        let e = env(&[("WORLD_SIZE", "0"), ("RANK", "0")]).unwrap_err().to_string();
        assert!(e.contains("a world of 0 ranks"), "{e}");
    }

    #[test]
    fn ranges_tile() {
        for n in 0..20 {
            for world in 1..7 {
                let mut next = 0;
                for rank in 0..world {
                    let r = Rank::new(rank, world).unwrap().range(n);
                    assert_eq!(r.start, next, "n={n} world={world} rank={rank}");
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }
}
