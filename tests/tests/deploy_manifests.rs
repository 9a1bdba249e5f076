//! deploy/: every Kubernetes manifest checked against the Kubernetes schemas with
//! kubernetes-validate (PyPI, installed by `cargo xtask setup`), plus the properties the
//! schemas cannot know: the DaemonSet's privileges, the ConfigMap's balancer config, the
//! HPA's metric, the Dockerfile's stages.
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios and fixture tables read top to bottom; the 80-line rule is the daemon's"
)]
#![allow(
    unused_crate_dependencies,
    reason = "every test target of the crate gets all its dev-dependencies and uses some"
)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_yaml::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy().join("k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "expected the namespace, ConfigMap, DaemonSet, Service and autoscaling example"
    );
    files
}

/// Every document of every manifest, with its file.
fn documents() -> Vec<(PathBuf, Value)> {
    let mut docs = Vec::new();
    for file in manifests() {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value =
                Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            docs.push((file.clone(), value));
        }
    }
    docs
}

use serde::Deserialize as _;

/// The validator: `$KUBERNETES_VALIDATE`, else the one `cargo xtask setup` installs.
fn validator() -> PathBuf {
    if let Some(path) = std::env::var_os("KUBERNETES_VALIDATE") {
        return PathBuf::from(path);
    }
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/venv/bin/kubernetes-validate");
    assert!(
        path.is_file(),
        "{} is missing: `cargo xtask setup` installs it (pip install kubernetes-validate into target/tools/venv)",
        path.display()
    );
    path
}

/// Runs the validator on `files` holding `documents` documents: whether every document
/// passed, and the report. A kind or apiVersion the validator has no schema for is only a
/// warning to it (custom resources), so a pass is counted per document.
fn validate(files: &[PathBuf], documents: usize) -> (bool, String) {
    let out = Command::new(validator())
        .args(["--strict", "--kubernetes-version", "1.30.0"])
        .args(files)
        .output()
        .expect("run kubernetes-validate");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let passed = report
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    (out.status.success() && passed == documents, report)
}

#[test]
fn manifests_match_the_kubernetes_schemas() {
    let (ok, report) = validate(&manifests(), documents().len());
    assert!(
        ok,
        "kubernetes-validate did not pass every document:\n{report}"
    );
}

#[test]
fn the_validator_rejects_a_wrong_manifest() {
    // The check above can fail: a wrong kind, a wrong apiVersion, an unknown field, a
    // missing required field.
    let dir = std::env::temp_dir().join(format!("lbt-{}-manifest", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            "kind.yaml",
            "apiVersion: apps/v1\nkind: DaemonSeet\nmetadata:\n  name: x\n",
        ),
        (
            "version.yaml",
            "apiVersion: apps/v9\nkind: DaemonSet\nmetadata:\n  name: x\n",
        ),
        (
            "field.yaml",
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\nspec:\n  portz: []\n",
        ),
        (
            "required.yaml",
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: x\nspec:\n  template: {}\n",
        ),
    ];
    for (name, text) in cases {
        let file = dir.join(name);
        std::fs::write(&file, text).unwrap();
        let (ok, report) = validate(&[file], 1);
        assert!(!ok, "{name} was accepted: {report}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn find<'a>(docs: &'a [(PathBuf, Value)], kind: &str) -> &'a Value {
    &docs
        .iter()
        .find(|(_, d)| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in deploy/k8s"))
        .1
}

#[test]
fn the_daemonset_has_host_network_and_only_the_capabilities_xdp_needs() {
    let docs = documents();
    let ds = find(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    let container = &pod["containers"][0];
    let caps = &container["securityContext"]["capabilities"];
    assert_eq!(caps["drop"], Value::from(vec!["ALL"]));
    assert_eq!(
        caps["add"],
        Value::from(vec!["BPF", "NET_ADMIN", "PERFMON"])
    );
    assert_ne!(container["securityContext"]["privileged"], true);
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert!(
        mounts.contains(&"/sys/fs/bpf")
            && mounts.contains(&"/etc/balancer")
            && mounts.contains(&"/run/balancer"),
        "{mounts:?}"
    );
    assert_eq!(
        container["args"],
        Value::from(vec!["run", "--config", "/etc/balancer/balancer.toml"])
    );
}

#[test]
fn the_configmap_holds_a_valid_balancer_config() {
    let docs = documents();
    let cm = docs
        .iter()
        .find(|(_, d)| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "balancer-config")
        .expect("balancer-config ConfigMap");
    let text = cm.1["data"]["balancer.toml"].as_str().unwrap();
    let config =
        balancer::config::parse(Path::new("deploy/k8s/configmap.yaml#balancer.toml"), text)
            .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        config.vips.iter().any(|v| v.autoscale.is_some()),
        "the HPA example needs an autoscale target"
    );
    assert_eq!(config.metrics_listen.port(), 9100);
}

#[test]
fn the_hpa_scales_on_the_balancers_metric_through_the_adapters_rule() {
    let docs = documents();
    let hpa = find(&docs, "HorizontalPodAutoscaler");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    let metric = &hpa["spec"]["metrics"][0]["external"]["metric"]["name"];
    let rules = docs
        .iter()
        .find(|(_, d)| {
            d["kind"] == "ConfigMap" && d["metadata"]["name"] == "prometheus-adapter-balancer-rules"
        })
        .expect("the prometheus-adapter rules");
    let config: Value =
        serde_yaml::from_str(rules.1["data"]["config.yaml"].as_str().unwrap()).unwrap();
    let exposed: Vec<&str> = config["externalRules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r["name"]["as"].as_str().unwrap())
        .collect();
    assert!(
        exposed.contains(&metric.as_str().unwrap()),
        "HPA metric {metric:?} not among {exposed:?}"
    );
    // The rule reads the per-backend counter (tests/tests/observability.rs scrapes it).
    let rule = config["externalRules"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| r["name"]["as"] == *metric)
        .unwrap();
    let series = rule["seriesQuery"].as_str().unwrap();
    assert!(
        series.starts_with("balancer_backend_new_flows_total{"),
        "{series}"
    );
}

#[test]
fn the_dockerfile_builds_in_one_stage_and_runs_in_another() {
    let text = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    let stages = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "multi-stage: {stages} FROM lines");
    assert!(
        text.contains("COPY --from=build /src/target/release/balancer"),
        "{text}"
    );
    assert!(text.contains("CMD [\"run\", \"--config\", \"/etc/balancer/balancer.toml\"]"));
}
