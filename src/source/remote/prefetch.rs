//! [`Prefetcher`]: fetches remote shards into the cache ahead of the decode workers, in the
//! order the epoch will read them, and holds the copies of the read window so that no
//! eviction takes them.
//!
//! The pipeline hands over a [`ReadPlan`] at each epoch's start: the shard of every read
//! this node will make in the epoch, in order, and the first shards of the next epoch. From
//! it the prefetcher keeps
//!
//! - a queue of shards in order of first need (the current epoch's, then the next epoch's
//!   first [`ahead`](Prefetcher::ahead) ones);
//! - per shard, the reads left in the current epoch; a shard whose reads are done (and that
//!   the next epoch's window does not need) is let go, and may then be evicted;
//! - the held copies: each is an open, share-locked file, so [`ShardCache::evict`] skips it,
//!   in this daemon or in any other sharing the cache.
//!
//! At most `ahead` shards are fetched or held before their first read (fetches run on
//! `ahead` threads, so that is also the most requests in flight), and the held copies stay
//! within a byte budget (half of `cache-limit`). A read that finds its shard neither held
//! nor cached does not wait for the whole shard: the dataset reads the member with one ranged
//! GET and moves the shard to the front of the queue ([`Prefetcher::urgent`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
#[cfg(test)]
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use super::cache::ShardCache;
use super::store::RemoteObject;

/// Default of `[source] fetch-ahead`: shards fetched ahead of the decode workers, and
/// fetches in flight at most.
pub const DEFAULT_FETCH_AHEAD: u32 = 4;

/// What one epoch will read, by shard number (positions in the dataset's shard list).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadPlan {
    /// The shard of each read of the current epoch, in order (repeats included).
    pub current: Vec<u32>,
    /// The shards the next epoch reads first, in order of first need.
    pub next: Vec<u32>,
}

impl ReadPlan {
    /// The shards of `reads` in order of first need, each once.
    pub fn first_needs(reads: impl IntoIterator<Item = u32>) -> Vec<u32> {
        let mut seen = HashSet::new();
        reads.into_iter().filter(|s| seen.insert(*s)).collect()
    }
}

/// Fetches remote shards ahead of their reads; see the module documentation.
#[derive(Debug)]
pub struct Prefetcher {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Signalled when a fetch may start: a plan arrived, a shard was let go or started, a
    /// fetch ended, or the prefetcher stops.
    wake: Condvar,
    cache: Arc<ShardCache>,
    objects: Vec<RemoteObject>,
    ahead: usize,
    budget: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Shards to fetch, in order of first need.
    queue: VecDeque<u32>,
    /// Reads left in the current epoch, per shard.
    left: HashMap<u32, u64>,
    /// The first shards of the next epoch: held once fetched, even with no read left now.
    next: HashSet<u32>,
    /// Shards read at least once since the plan began.
    started: HashSet<u32>,
    /// Copies fetched and held.
    held: HashMap<u32, Arc<File>>,
    /// Shards being fetched.
    in_flight: HashSet<u32>,
    /// Fetches finished (copies now held, or let go at once), for tests and logs.
    fetched: u64,
    /// Most shards ever fetched or held before their first read, for tests.
    max_ahead: usize,
    stop: bool,
}

impl State {
    fn needed(&self, shard: u32) -> bool {
        self.left.get(&shard).is_some_and(|&n| n > 0) || self.next.contains(&shard)
    }

    /// Shards fetched or being fetched whose first read has not come yet.
    fn ahead_count(&self) -> usize {
        self.held
            .keys()
            .chain(self.in_flight.iter())
            .filter(|s| !self.started.contains(s))
            .count()
    }
}

impl Prefetcher {
    /// A prefetcher of `objects` (the dataset's remote shards, by shard number) into `cache`,
    /// `ahead` shards ahead on as many threads, holding at most `budget` bytes of copies
    /// (the first held copy is allowed past it). Idle until [`plan`](Self::plan).
    pub fn new(
        cache: Arc<ShardCache>,
        objects: Vec<RemoteObject>,
        ahead: u32,
        budget: u64,
    ) -> Prefetcher {
        let ahead = ahead.max(1) as usize;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            cache,
            objects,
            ahead,
            budget,
        });
        let threads = (0..ahead)
            .filter_map(|i| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("ringfeed-fetch-{i}"))
                    .spawn(move || shared.run())
                    .map_err(|e| log::warn!("cannot start a fetch thread: {e}"))
                    .ok()
            })
            .collect();
        Prefetcher { shared, threads }
    }

    /// Shards fetched ahead at most (and fetches in flight at most).
    pub fn ahead(&self) -> usize {
        self.shared.ahead
    }

    /// Replaces the plan: copies the new plan does not need are let go, the queue becomes the
    /// new order of first need (copies held or in flight are not fetched again).
    pub fn plan(&self, plan: &ReadPlan) {
        let mut state = self.shared.lock();
        state.left.clear();
        for &shard in &plan.current {
            *state.left.entry(shard).or_default() += 1;
        }
        state.next = plan.next.iter().copied().take(self.shared.ahead).collect();
        state.started.clear();
        let current = ReadPlan::first_needs(plan.current.iter().copied());
        let order = ReadPlan::first_needs(current.into_iter().chain(state.next.clone()));
        let held: Vec<u32> = state.held.keys().copied().collect();
        for shard in held {
            if !state.needed(shard) {
                state.held.remove(&shard);
            }
        }
        state.queue = order
            .into_iter()
            .filter(|s| !state.held.contains_key(s) && !state.in_flight.contains(s))
            .filter(|&s| (s as usize) < self.shared.objects.len())
            .collect();
        drop(state);
        self.shared.wake.notify_all();
    }

    /// True once a plan was given: reads of shards not yet cached may then be served by
    /// ranged reads while the prefetcher brings the shard.
    pub fn planned(&self) -> bool {
        let state = self.shared.lock();
        !state.left.is_empty() || !state.next.is_empty()
    }

    /// The held copy of `shard`, if fetched; counts as the shard's first read having come.
    pub fn copy(&self, shard: u32) -> Option<Arc<File>> {
        let mut state = self.shared.lock();
        let file = state.held.get(&shard).cloned();
        if state.started.insert(shard) {
            drop(state);
            self.shared.wake.notify_all();
        }
        file
    }

    /// `shard` is read before its copy is here: fetch it next.
    pub fn urgent(&self, shard: u32) {
        let mut state = self.shared.lock();
        state.started.insert(shard);
        if let Some(at) = state.queue.iter().position(|&s| s == shard) {
            if at > 0 {
                state.queue.remove(at);
                state.queue.push_front(shard);
            }
        } else if !state.held.contains_key(&shard)
            && !state.in_flight.contains(&shard)
            && (shard as usize) < self.shared.objects.len()
        {
            state.queue.push_front(shard);
        }
        drop(state);
        self.shared.wake.notify_all();
    }

    /// One read of `shard` is done (its first read has come, then); its last read of the
    /// epoch lets its copy go (unless the next epoch's window needs it).
    pub fn consumed(&self, shard: u32) {
        let mut state = self.shared.lock();
        let mut wake = state.started.insert(shard);
        if let Some(left) = state.left.get_mut(&shard) {
            *left = left.saturating_sub(1);
            let done = *left == 0;
            wake |= done && !state.next.contains(&shard) && state.held.remove(&shard).is_some();
        }
        drop(state);
        if wake {
            self.shared.wake.notify_all();
        }
    }

    /// Shards whose copies are held now, sorted.
    pub fn held(&self) -> Vec<u32> {
        let mut held: Vec<u32> = self.shared.lock().held.keys().copied().collect();
        held.sort_unstable();
        held
    }

    /// Fetches finished so far, and the most shards ever fetched or held ahead of their
    /// first read at once.
    pub fn stats(&self) -> (u64, usize) {
        let state = self.shared.lock();
        (state.fetched, state.max_ahead)
    }

    /// Waits until the queue is empty and no fetch is in flight (or fetching is blocked by
    /// the window), at most `timeout`; true if it became idle.
    pub fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if state.in_flight.is_empty() && self.shared.next_fetch(&state).is_none() {
                return true;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .shared
                .wake
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for Prefetcher {
    /// Lets every held copy go and stops the fetch threads without waiting for them: one in
    /// the middle of a fetch may take up to the request timeout to return, and a daemon told to
    /// stop must not wait for that (a fetch cut off by the exit leaves a temporary copy that
    /// the next daemon removes).
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.stop = true;
        state.held.clear();
        state.queue.clear();
        drop(state);
        self.shared.wake.notify_all();
        self.threads.clear();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The shard to fetch next, if the window and the budget allow one now.
    fn next_fetch(&self, state: &State) -> Option<u32> {
        let &shard = state.queue.front()?;
        let started = state.started.contains(&shard);
        // A shard already being read is fetched whatever the window: its reads wait on it.
        if !started && state.ahead_count() >= self.ahead {
            return None;
        }
        let size = |s: &u32| self.objects[*s as usize].size;
        let held: u64 = state
            .held
            .keys()
            .chain(state.in_flight.iter())
            .map(size)
            .sum();
        let nothing_held = state.held.is_empty() && state.in_flight.is_empty();
        if !nothing_held && held.saturating_add(size(&shard)) > self.budget {
            return None;
        }
        Some(shard)
    }

    /// A fetch thread: takes the next shard the window allows, fetches it into the cache
    /// (another daemon fetching it meanwhile is waited for, see [`ShardCache::open`]) and
    /// holds the copy while the plan needs it.
    fn run(&self) {
        let mut state = self.lock();
        loop {
            if state.stop {
                return;
            }
            let Some(shard) = self.next_fetch(&state) else {
                state = self
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            };
            state.queue.pop_front();
            state.in_flight.insert(shard);
            let ahead = state.ahead_count();
            state.max_ahead = state.max_ahead.max(ahead);
            drop(state);
            let object = &self.objects[shard as usize];
            let result = self.cache.open(object);
            state = self.lock();
            state.in_flight.remove(&shard);
            state.fetched += 1;
            match result {
                Ok(file) if state.needed(shard) => {
                    state.held.insert(shard, Arc::new(file));
                }
                Ok(_) => {}
                // Its reads fetch (or range-read) it themselves, and skip and count what
                // fails there.
                Err(e) => log::warn!("fetching ahead: {e}"),
            }
            self.wake.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::remote::{ObjectUrl, Store};
    use std::time::Duration;

    const SIZE: u64 = 100;

    /// A cache holding complete copies of `n` shards of [`SIZE`] bytes (so opening one needs
    /// no server), and the objects.
    fn planted(
        dir: &std::path::Path,
        n: u32,
        limit: Option<u64>,
    ) -> (Arc<ShardCache>, Vec<RemoteObject>) {
        let cache =
            Arc::new(ShardCache::new(dir, limit, Arc::new(Store::new(false).unwrap())).unwrap());
        let objects: Vec<RemoteObject> = (0..n)
            .map(|i| RemoteObject {
                url: ObjectUrl {
                    scheme: Default::default(),
                    bucket: "b".to_owned(),
                    key: format!("s-{i}.tar"),
                },
                size: SIZE,
                etag: Some(format!("\"e{i}\"")),
                mtime_ns: 0,
            })
            .collect();
        for object in &objects {
            let path = cache.path_of(object);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, vec![1u8; SIZE as usize]).unwrap();
        }
        (cache, objects)
    }

    fn settle(p: &Prefetcher) {
        assert!(
            p.wait_idle(Duration::from_secs(30)),
            "fetching did not settle"
        );
    }

    #[test]
    fn fetches_in_order_of_first_need_no_more_than_ahead_before_their_reads() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, objects) = planted(dir.path(), 6, None);
        let p = Prefetcher::new(cache, objects, 2, u64::MAX);
        assert!(!p.planned());
        assert!(p.held().is_empty(), "nothing before a plan");
        // Reads of shards 4, 4, 1, 0, 1, 5, 0: first needs 4, 1, 0, 5.
        p.plan(&ReadPlan {
            current: vec![4, 4, 1, 0, 1, 5, 0],
            next: Vec::new(),
        });
        assert!(p.planned());
        settle(&p);
        assert_eq!(p.held(), [1, 4], "the first two shards the epoch needs");
        // Shard 4's first read moves the window on by one.
        assert!(p.copy(4).is_some());
        settle(&p);
        assert_eq!(p.held(), [0, 1, 4]);
        // Its last read lets it go.
        p.consumed(4);
        assert_eq!(p.held(), [0, 1, 4], "one read of 4 is left");
        p.consumed(4);
        assert_eq!(p.held(), [0, 1]);
        for s in [1, 0] {
            p.copy(s);
        }
        settle(&p);
        assert_eq!(p.held(), [0, 1, 5]);
        let (fetched, max_ahead) = p.stats();
        assert_eq!(fetched, 4, "each needed shard fetched once; 2 and 3 never");
        assert!(max_ahead <= 2, "{max_ahead} shards ahead of their reads");
    }

    #[test]
    fn held_copies_stay_within_the_budget_and_are_never_evicted() {
        let dir = tempfile::tempdir().unwrap();
        // Room for two copies; the held ones are the read window.
        let (cache, objects) = planted(dir.path(), 6, Some(2 * SIZE));
        let paths: Vec<_> = objects.iter().map(|o| cache.path_of(o)).collect();
        let p = Prefetcher::new(Arc::clone(&cache), objects, 4, 3 * SIZE);
        // A global shuffle's epoch: every shard is read from the start.
        let current: Vec<u32> = (0..6).chain(0..6).collect();
        p.plan(&ReadPlan {
            current: current.clone(),
            next: Vec::new(),
        });
        for s in 0..6 {
            p.copy(s);
        }
        settle(&p);
        assert_eq!(p.held(), [0, 1, 2], "three copies fit the budget");
        cache.evict(Path::new(""));
        let left: Vec<bool> = paths.iter().map(|p| p.exists()).collect();
        assert_eq!(
            left,
            [true, true, true, false, false, false],
            "held copies stay"
        );
        drop(p);
        cache.evict(Path::new(""));
        assert_eq!(
            paths.iter().filter(|p| p.exists()).count(),
            2,
            "let go, they are evicted down to the limit"
        );
    }

    #[test]
    fn the_next_epochs_first_shards_are_fetched_and_kept_across_the_epoch_end() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, objects) = planted(dir.path(), 6, None);
        let p = Prefetcher::new(cache, objects, 2, u64::MAX);
        p.plan(&ReadPlan {
            current: vec![0, 1],
            next: vec![1, 5, 3, 2],
        });
        for s in [0, 1] {
            p.copy(s);
            p.consumed(s);
        }
        settle(&p);
        // 1 stays held for the next epoch; 5 and 3 (its next first needs within the window)
        // came; 0 is done.
        assert_eq!(p.held(), [1, 5]);
        p.plan(&ReadPlan {
            current: vec![1, 5, 3, 2],
            next: Vec::new(),
        });
        settle(&p);
        assert_eq!(p.held(), [1, 5], "kept: the new epoch's window is full");
        p.copy(1);
        settle(&p);
        assert_eq!(p.held(), [1, 3, 5]);
        assert_eq!(
            p.stats().0,
            4,
            "0, 1, 5, 3: held copies are not fetched again"
        );
    }

    #[test]
    fn first_needs_keep_the_order_of_first_reads() {
        assert_eq!(ReadPlan::first_needs([3, 1, 3, 0, 1, 2]), [3, 1, 0, 2]);
        assert!(ReadPlan::first_needs([]).is_empty());
    }
}
