//! The demo's client: new connections at a rate that ramps up and down ([`LoadShape`]), each
//! one short HTTP GET, started on schedule whatever the earlier ones are doing (a thread per
//! connection), from the client's namespace.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use balancer_tests::{http::get, netns::Netns};

/// New connections per second over time: straight lines between `(second, rate)` points.
#[derive(Clone, Copy, Debug)]
pub struct LoadShape(pub &'static [(f64, f64)]);

impl LoadShape {
    pub fn rate_at(&self, t: f64) -> f64 {
        let points = self.0;
        let Some(&(first_t, first_rate)) = points.first() else {
            return 0.0;
        };
        if t <= first_t {
            return first_rate;
        }
        for pair in points.windows(2) {
            let [(t0, r0), (t1, r1)] = [pair[0], pair[1]];
            if t <= t1 {
                return if t1 > t0 {
                    r0 + (r1 - r0) * (t - t0) / (t1 - t0)
                } else {
                    r1
                };
            }
        }
        points.last().map_or(0.0, |p| p.1)
    }

    /// Seconds until the last point.
    pub fn duration(&self) -> f64 {
        self.0.last().map_or(0.0, |p| p.0)
    }

    pub fn peak(&self) -> f64 {
        self.0.iter().map(|p| p.1).fold(0.0, f64::max)
    }
}

/// One connection, done.
#[derive(Clone, Debug)]
pub struct Completed {
    /// Seconds since the load started.
    pub started: f64,
    /// The backend that answered (its name: its address), or why it failed.
    pub result: Result<String, String>,
}

/// The client, running until the shape's end or [`RampedLoad::finish`].
pub struct RampedLoad {
    stop: Arc<AtomicBool>,
    started: Arc<AtomicU64>,
    results: mpsc::Receiver<Completed>,
    thread: Option<JoinHandle<()>>,
}

impl RampedLoad {
    /// Starts connecting from `ns` to `to` on the schedule of `shape`, from `epoch`.
    pub fn start(ns: &Netns, to: SocketAddr, shape: LoadShape, epoch: Instant) -> RampedLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicU64::new(0));
        let (sender, results) = mpsc::channel();
        let (flag, count) = (stop.clone(), started.clone());
        let thread = ns.spawn(move || {
            let mut workers: Vec<JoinHandle<()>> = Vec::new();
            let mut next = 0.0f64;
            let mut id = 0u64;
            while !flag.load(Ordering::Relaxed) && next < shape.duration() {
                let at = epoch + Duration::from_secs_f64(next);
                if let Some(wait) = at.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                // Threads spawned here live in this thread's namespace.
                let sender = sender.clone();
                workers.push(std::thread::spawn(move || {
                    let result = get(to, 0, id).map(|served| served.backend);
                    let _ = sender.send(Completed {
                        started: next,
                        result,
                    });
                }));
                count.fetch_add(1, Ordering::Relaxed);
                workers.retain(|w| !w.is_finished());
                id += 1;
                next += 1.0 / shape.rate_at(next).max(0.1);
            }
            for worker in workers {
                let _ = worker.join();
            }
        });
        RampedLoad {
            stop,
            started,
            results,
            thread: Some(thread),
        }
    }

    /// Connections started so far.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// Connections completed since the last call.
    pub fn completed(&self) -> Vec<Completed> {
        self.results.try_iter().collect()
    }

    /// Starts no more connections, waits for those under way, and returns the ones
    /// completed since the last [`completed`](Self::completed).
    pub fn finish(mut self) -> Vec<Completed> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.completed()
    }
}

impl Drop for RampedLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shape_is_straight_lines_between_its_points() {
        let shape = LoadShape(&[(0.0, 5.0), (10.0, 5.0), (20.0, 105.0), (30.0, 5.0)]);
        for (t, rate) in [
            (-1.0, 5.0),
            (0.0, 5.0),
            (10.0, 5.0),
            (15.0, 55.0),
            (20.0, 105.0),
            (27.5, 30.0),
            (30.0, 5.0),
            (40.0, 5.0),
        ] {
            assert!((shape.rate_at(t) - rate).abs() < 1e-9, "at {t}");
        }
        assert_eq!((shape.duration(), shape.peak()), (30.0, 105.0));
    }
}
