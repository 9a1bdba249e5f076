//! The health-check tasks: one per checked backend, started, restarted and stopped to match
//! the check set the core decides on; each result comes back to the event loop. Probes run
//! concurrently up to a budget of descriptors of their own (`probe_budget`): a probe waits
//! for a slot before it starts (its timeout starts with it), so that thousands of backends
//! cannot exhaust the daemon's descriptors, and clients of the API, which has its own cap,
//! cannot take the probes' share.

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Instant};

use tokio::{
    sync::{mpsc, Semaphore},
    task::JoinHandle,
};

use crate::{
    config::HealthCheck,
    core::{
        health::{first_delay, next_delay, ProbeResult},
        reload::CheckSet,
    },
    plan::inputs::BackendKey,
    shell::probe::probe,
};

/// A probe's result, as the event loop receives it.
#[derive(Debug)]
pub struct ProbeDone {
    pub key: BackendKey,
    /// Which task ran it: results of a task replaced since are ignored.
    pub serial: u64,
    pub result: ProbeResult,
    /// How long the probe took.
    pub seconds: f64,
}

/// Probes that may run at once, from the daemon's open-files limit: a quarter of it, at least
/// 16 and at most 4096 (each probe holds one socket).
pub fn probe_budget(nofile: u64) -> usize {
    (nofile / 4).clamp(16, 4096) as usize
}

pub struct ProbeTasks {
    results: mpsc::Sender<ProbeDone>,
    tasks: HashMap<BackendKey, (HealthCheck, u64, JoinHandle<()>)>,
    serial: u64,
    slots: Arc<Semaphore>,
}

impl ProbeTasks {
    /// Tasks whose probes run at most `budget` at once.
    pub fn new(results: mpsc::Sender<ProbeDone>, budget: usize) -> Self {
        ProbeTasks {
            results,
            tasks: HashMap::new(),
            serial: 0,
            slots: Arc::new(Semaphore::new(budget)),
        }
    }

    /// Whether `done` comes from the task that probes its backend now.
    pub fn is_current(&self, done: &ProbeDone) -> bool {
        self.tasks
            .get(&done.key)
            .is_some_and(|(_, serial, _)| *serial == done.serial)
    }

    /// Starts checks for new backends, restarts changed ones, stops the others.
    pub fn sync(&mut self, wanted: &CheckSet) {
        self.tasks.retain(|key, (check, _, task)| {
            let keep = wanted.get(key).is_some_and(|(_, c)| c == check);
            if !keep {
                task.abort();
            }
            keep
        });
        for (key, (address, check)) in wanted {
            if self.tasks.contains_key(key) {
                continue;
            }
            self.serial += 1;
            let task = tokio::spawn(run(
                key.clone(),
                *address,
                check.clone(),
                self.serial,
                self.results.clone(),
                self.slots.clone(),
            ));
            self.tasks
                .insert(key.clone(), (check.clone(), self.serial, task));
        }
    }

    pub fn stop(&mut self) {
        for (_, (_, _, task)) in self.tasks.drain() {
            task.abort();
        }
    }
}

/// Probes one backend at its check's interval (jittered) until aborted.
async fn run(
    key: BackendKey,
    address: IpAddr,
    check: HealthCheck,
    serial: u64,
    results: mpsc::Sender<ProbeDone>,
    slots: Arc<Semaphore>,
) {
    tokio::time::sleep(first_delay(check.interval, fastrand::f64())).await;
    loop {
        // Closed: shutting down.
        let Ok(slot) = slots.acquire().await else {
            return;
        };
        let started = Instant::now();
        let result = probe(address, &check).await;
        drop(slot);
        let done = ProbeDone {
            key: key.clone(),
            serial,
            result,
            seconds: started.elapsed().as_secs_f64(),
        };
        if results.send(done).await.is_err() {
            return;
        }
        tokio::time::sleep(next_delay(check.interval, fastrand::f64())).await;
    }
}
