//! Criterion benches of the pure domain transitions: the shadow deployable decision
//! (procure, release, min-pod-count) and the controller's placement and scale-up
//! planning over ~100 workers. Run with `cargo bench --bench domain`.

use chrono::{DateTime, Utc};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use resource_plane::domain::controller::{best_fit, plan_scale_up};
use resource_plane::domain::shadow::{
    decide, Context, MinPodAction, ShadowCommand, ShadowDeployable,
};
use resource_plane::domain::worker::{Instance, Resources, Worker, WorkerState, WorkerTemplate};

fn now() -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap_or_default()
}

fn ctx() -> Context {
    Context {
        now: now(),
        retry_delay: 300,
    }
}

fn template(name: &str, cpu: f64, memory_gb: f64, cost: f64) -> WorkerTemplate {
    WorkerTemplate {
        name: name.into(),
        instance_type: Some(name.into()),
        image_id: Some("ami-12c6146b".into()),
        capacity: Resources { cpu, memory_gb },
        min_workers: 0,
        max_workers: 500,
        hourly_cost: cost,
        ..WorkerTemplate::default()
    }
}

/// 100 RUNNING workers of two sizes, each partly allocated (deterministic spread).
fn fleet(templates: &[WorkerTemplate]) -> Vec<Worker> {
    (0..100)
        .map(|i| {
            let t = &templates[i % templates.len()];
            let mut w = Worker::new(&format!("w-{i:03}"), t, now());
            w.state = WorkerState::Running;
            let used = ((i * 37) % 100) as f64 / 100.0;
            w.allocated = Resources {
                cpu: (t.capacity.cpu * used).floor(),
                memory_gb: (t.capacity.memory_gb * used).floor(),
            };
            w
        })
        .collect()
}

fn shadow(c: &mut Criterion) {
    let free = ShadowDeployable::new("int-predator-g2-std-16", "g2-std-16", "x.example", now());
    let procure = ShadowCommand::Procure {
        run_id: "er5tdgsh".into(),
        plan: Some("pre-scaleup-load-test".into()),
        lease_seconds: None,
    };
    let held = match decide(Some(&free), &procure, ctx()).map(|d| d.change) {
        Ok(resource_plane::domain::shadow::Change::Put(next)) => next,
        other => panic!("procure of a FREE deployable must change it: {other:?}"),
    };
    let other = ShadowCommand::Procure {
        run_id: "someone-else".into(),
        plan: None,
        lease_seconds: None,
    };
    let increase = ShadowCommand::MinPodCount {
        run_id: "er5tdgsh".into(),
        action: MinPodAction::Increase,
        count: 4,
    };
    let release = ShadowCommand::Release {
        run_id: "er5tdgsh".into(),
    };
    let mut g = c.benchmark_group("shadow::decide");
    g.bench_function("procure (FREE)", |b| {
        b.iter(|| decide(black_box(Some(&free)), black_box(&procure), ctx()))
    });
    g.bench_function("procure (held by another)", |b| {
        b.iter(|| decide(black_box(Some(&held)), black_box(&other), ctx()))
    });
    g.bench_function("min-pod-count INCREASE", |b| {
        b.iter(|| decide(black_box(Some(&held)), black_box(&increase), ctx()))
    });
    g.bench_function("release", |b| {
        b.iter(|| decide(black_box(Some(&held)), black_box(&release), ctx()))
    });
    g.finish();
}

fn controller(c: &mut Criterion) {
    let templates = vec![
        template("m5zn-metal", 48.0, 192.0, 3.96),
        template("m5-xlarge", 4.0, 16.0, 0.192),
    ];
    let workers = fleet(&templates);
    let req = Resources {
        cpu: 2.0,
        memory_gb: 8.0,
    };
    let mut g = c.benchmark_group("controller");
    g.bench_function("best_fit (100 workers)", |b| {
        b.iter(|| best_fit(black_box(&workers), black_box(&req)).map(|w| w.id.len()))
    });
    // Demand that does not fit the fleet: 50 pending instances of mixed sizes, on a
    // fleet that is nearly full, so the planner has to pack and choose templates.
    let full: Vec<Worker> = workers
        .iter()
        .cloned()
        .map(|mut w| {
            w.allocated = Resources {
                cpu: w.capacity.cpu - 1.0,
                memory_gb: w.capacity.memory_gb - 4.0,
            };
            w
        })
        .collect();
    let pending: Vec<Instance> = (0..50)
        .map(|i| {
            let r = Resources {
                cpu: [2.0, 4.0, 8.0, 16.0][i % 4],
                memory_gb: [8.0, 16.0, 32.0, 64.0][i % 4],
            };
            Instance::new(&format!("i-{i:03}"), r, false, now())
        })
        .collect();
    g.bench_function("plan_scale_up (50 pending, 100 workers)", |b| {
        b.iter(|| plan_scale_up(black_box(&pending), black_box(&full), black_box(&templates)))
    });
    g.finish();
}

criterion_group!(benches, shadow, controller);
criterion_main!(benches);
