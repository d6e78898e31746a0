//! Policy: where to find room, which idle models to evict, and where to place
//! automatically placed models. Plain functions over plain data (a snapshot
//! taken from the ledger), testable without threads or tensors.

use crate::Location;

/// An idle model that could leave a pool now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub id: u64,
    /// Logical time of its last use (smaller: older).
    pub last_used: u64,
    /// Bytes it would free in the pool.
    pub charge: u64,
    /// Disk bytes its eviction would write (0: it has a valid disk copy, or
    /// it does not go to the disk).
    pub write: u64,
}

/// A pool as room-making sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolView {
    pub budget: u64,
    pub used: u64,
    /// What the device can still take physically (driver free memory plus the
    /// allocator's idle cache, less a headroom), where that is known.
    pub physical: Option<u64>,
    /// Bytes held in the pool by models that are in use or moving.
    pub busy: u64,
    /// Free room on the disk, for victims that must be written there.
    pub disk_free: u64,
}

/// Outcome of looking for room in one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Room {
    /// The room is free now.
    Free,
    /// Evicting these models (oldest first) makes the room.
    Evict(Vec<u64>),
    /// Models in use or moving hold the room: waiting may help.
    Wait,
    /// More than the whole budget.
    TooLarge,
    /// Not even evicting every idle model and waiting for every busy one helps.
    Full,
}

/// Looks for `need` bytes in a pool, choosing idle victims least recently used
/// first, as few as needed. Victims that free nothing or that must be written
/// to a disk without room are passed over.
pub(crate) fn room(pool: PoolView, need: u64, mut cands: Vec<Candidate>) -> Room {
    if need > pool.budget {
        return Room::TooLarge;
    }
    let mut have = pool.budget.saturating_sub(pool.used);
    if let Some(phys) = pool.physical {
        // Evicting a model frees its bytes in both senses, so the smaller one rules.
        have = have.min(phys);
    }
    if have >= need {
        return Room::Free;
    }
    cands.sort_unstable_by_key(|c| (c.last_used, c.id));
    let mut disk_free = pool.disk_free;
    let mut victims = Vec::new();
    for c in cands {
        if have >= need {
            break;
        }
        if c.charge == 0 || c.write > disk_free {
            continue;
        }
        disk_free -= c.write;
        victims.push(c.id);
        have += c.charge;
    }
    if have >= need {
        Room::Evict(victims)
    } else if have + pool.busy >= need {
        Room::Wait
    } else {
        Room::Full
    }
}

/// Chooses devices for a batch of loads at once. `free` is each CUDA pool's
/// free budget (in pool order); each load is `Some(bytes)` to be placed
/// automatically or `None` when its device is fixed (already resident, moving
/// or explicit). Every automatic load goes, largest first, to the pool with
/// the most room left once the loads placed before it are counted (the lowest
/// index on a tie), so a batch spreads over devices that together have room.
pub(crate) fn place_batch(free: &[(Location, u64)], loads: &[Option<u64>]) -> Vec<Option<Location>> {
    let mut left: Vec<(Location, i128)> = free.iter().map(|&(l, f)| (l, f as i128)).collect();
    let mut order: Vec<usize> = (0..loads.len()).filter(|&i| loads[i].is_some()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(loads[i]));
    let mut out = vec![None; loads.len()];
    for i in order {
        let bytes = loads[i].expect("automatic") as i128;
        let best = left.iter_mut().max_by_key(|(l, f)| (*f, std::cmp::Reverse(*l)));
        if let Some((loc, f)) = best {
            *f -= bytes;
            out[i] = Some(*loc);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(budget: u64, used: u64) -> PoolView {
        PoolView { budget, used, physical: None, busy: 0, disk_free: u64::MAX }
    }

    fn cand(id: u64, last_used: u64, charge: u64) -> Candidate {
        Candidate { id, last_used, charge, write: 0 }
    }

    #[test]
    fn free_room_evicts_nothing() {
        assert_eq!(room(view(100, 40), 60, vec![cand(1, 1, 40)]), Room::Free);
    }

    #[test]
    fn victims_are_the_least_recently_used_and_as_few_as_needed() {
        // 100 budget, 90 used by three idle models; 40 needed: the oldest (id 2,
        // t=1) frees 20, not enough; the next oldest (id 3, t=2) makes it.
        let c = vec![cand(1, 3, 50), cand(2, 1, 20), cand(3, 2, 20)];
        assert_eq!(room(view(100, 90), 40, c.clone()), Room::Evict(vec![2, 3]));
        assert_eq!(room(view(100, 90), 30, c), Room::Evict(vec![2]));
    }

    #[test]
    fn victims_that_free_nothing_or_cannot_be_written_are_skipped() {
        let mut pool = view(100, 100);
        pool.disk_free = 10;
        let c = vec![
            cand(1, 1, 0),                                            // frees nothing
            Candidate { id: 2, last_used: 2, charge: 50, write: 50 }, // no disk room
            cand(3, 3, 50),
        ];
        assert_eq!(room(pool, 40, c), Room::Evict(vec![3]));
    }

    #[test]
    fn busy_bytes_mean_wait_and_beyond_them_full() {
        let mut pool = view(100, 100);
        pool.busy = 60;
        assert_eq!(room(pool, 50, vec![]), Room::Wait);
        assert_eq!(room(pool, 50, vec![cand(1, 1, 20)]), Room::Wait);
        pool.busy = 10;
        assert_eq!(room(pool, 50, vec![cand(1, 1, 20)]), Room::Full);
        assert_eq!(room(pool, 101, vec![]), Room::TooLarge);
    }

    #[test]
    fn physical_memory_rules_when_smaller() {
        let mut pool = view(100, 0);
        pool.physical = Some(15);
        assert_eq!(room(pool, 30, vec![cand(7, 1, 20)]), Room::Evict(vec![7]));
    }

    #[test]
    fn a_batch_spreads_over_devices() {
        let free = [(Location::Cuda(0), 10), (Location::Cuda(1), 10)];
        let placed = place_batch(&free, &[Some(6), Some(6), None]);
        assert_eq!(placed, vec![Some(Location::Cuda(0)), Some(Location::Cuda(1)), None]);
        // Largest first: the 8 goes to the roomier device, then the 3 to the other.
        let free = [(Location::Cuda(0), 10), (Location::Cuda(1), 12)];
        assert_eq!(
            place_batch(&free, &[Some(3), Some(8)]),
            vec![Some(Location::Cuda(0)), Some(Location::Cuda(1))]
        );
        assert_eq!(place_batch(&[], &[Some(1)]), vec![None]);
    }
}
