//! The health-check tasks: one per checked backend, started, restarted and stopped to match
//! the check set the core decides on; each result comes back to the event loop.

use std::{collections::HashMap, net::IpAddr, time::Instant};

use tokio::{sync::mpsc, task::JoinHandle};

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

pub struct ProbeTasks {
    results: mpsc::Sender<ProbeDone>,
    tasks: HashMap<BackendKey, (HealthCheck, u64, JoinHandle<()>)>,
    serial: u64,
}

impl ProbeTasks {
    pub fn new(results: mpsc::Sender<ProbeDone>) -> Self {
        ProbeTasks {
            results,
            tasks: HashMap::new(),
            serial: 0,
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
) {
    tokio::time::sleep(first_delay(check.interval, fastrand::f64())).await;
    loop {
        let started = Instant::now();
        let result = probe(address, &check).await;
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
