//! deploy/: every Kubernetes manifest checked against the Kubernetes schemas with
//! kubernetes-validate (PyPI, installed by `cargo xtask setup`), plus the properties the
//! schemas cannot know: the DaemonSet's privileges and placement, the example application's
//! headless Service, the ConfigMap's balancer config discovering that Service, the HPA's
//! target and metric, the Dockerfile's stages.
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
        files.len() >= 6,
        "expected the namespace, ConfigMap, DaemonSet, Service, example application and \
         autoscaling example"
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

fn find_named<'a>(docs: &'a [(PathBuf, Value)], kind: &str, name: &str) -> &'a Value {
    &docs
        .iter()
        .find(|(_, d)| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/k8s"))
        .1
}

fn text<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: not a string ({value:?})"))
}

#[test]
fn the_daemonset_has_host_network_and_only_the_capabilities_xdp_needs() {
    let docs = documents();
    let ds = find(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    // Discovery resolves names with the cluster DNS from the host's network.
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
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

/// The example application: its Deployment, and the Service of its namespace.
fn web_app(docs: &[(PathBuf, Value)]) -> (&Value, &Value) {
    let deployment = find(docs, "Deployment");
    let service = docs
        .iter()
        .map(|(_, d)| d)
        .find(|d| {
            d["kind"] == "Service"
                && d["metadata"]["namespace"] == deployment["metadata"]["namespace"]
        })
        .expect("a Service beside the example Deployment");
    (deployment, service)
}

#[test]
fn a_headless_service_publishes_the_example_applications_pods() {
    let docs = documents();
    let (deployment, service) = web_app(&docs);
    // Headless: the DNS name answers with the pods' addresses, which discovery reads.
    assert_eq!(service["spec"]["clusterIP"], "None");
    assert_ne!(service["spec"]["publishNotReadyAddresses"], true);
    let selector = service["spec"]["selector"].as_mapping().expect("selector");
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert!(!selector.is_empty());
    for (key, value) in selector {
        assert_eq!(&labels[key], value, "pod label {key:?}");
    }
    assert_eq!(
        deployment["spec"]["selector"]["matchLabels"],
        service["spec"]["selector"]
    );
    // The Service's port is the container's (by number or by name).
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let port = &service["spec"]["ports"][0];
    let container_port = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == port["targetPort"] || p["containerPort"] == port["targetPort"])
        .expect("the Service's targetPort is a port of the container");
    assert_eq!(port["port"], container_port["containerPort"]);
    assert!(
        container["readinessProbe"]["httpGet"].is_mapping(),
        "the DNS lists pods once ready: they need a readiness probe"
    );
}

#[test]
fn the_example_application_runs_off_the_balancers_nodes() {
    // A pod on a balancer's node sits behind a veth, into which XDP forwards only when the
    // pod's end has an XDP program: the Deployment avoids the nodes the DaemonSet runs on.
    let docs = documents();
    let ds = find(&docs, "DaemonSet");
    let selector = ds["spec"]["template"]["spec"]["nodeSelector"]
        .as_mapping()
        .expect("the DaemonSet runs on labelled nodes");
    let (deployment, _) = web_app(&docs);
    let terms = &deployment["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
        ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
    let terms = terms.as_sequence().expect("required node affinity");
    for (label, _) in selector {
        for term in terms {
            let avoided = term["matchExpressions"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|e| &e["key"] == label && e["operator"] == "DoesNotExist");
            assert!(
                avoided,
                "every term excludes nodes labelled {label:?}: {term:?}"
            );
        }
    }
}

/// The VIP of the ConfigMap's balancer config that discovers its backends (parsed by the
/// balancer's own parser), and the config.
fn discovering_vip(docs: &[(PathBuf, Value)]) -> (balancer::config::Vip, balancer::config::Config) {
    let cm = find_named(docs, "ConfigMap", "balancer-config");
    let text = text(&cm["data"]["balancer.toml"], "balancer.toml");
    let config =
        balancer::config::parse(Path::new("deploy/k8s/configmap.yaml#balancer.toml"), text)
            .unwrap_or_else(|e| panic!("{e}"));
    let vip = config
        .vips
        .iter()
        .find(|v| v.discover.is_some())
        .expect("a VIP with `discover`")
        .clone();
    (vip, config)
}

#[test]
fn the_configmap_discovers_the_example_application_by_dns() {
    let docs = documents();
    let (vip, config) = discovering_vip(&docs);
    assert_eq!(config.metrics_listen.port(), 9100);
    let (deployment, service) = web_app(&docs);
    let discover = vip.discover.as_ref().unwrap();
    let name = format!(
        "{}.{}.svc.cluster.local",
        text(&service["metadata"]["name"], "Service name"),
        text(&service["metadata"]["namespace"], "Service namespace")
    );
    assert_eq!(
        discover.query,
        balancer::config::DiscoverQuery::Dns(name),
        "the VIP discovers the headless Service's name (A/AAAA records)"
    );
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let container_port = container["ports"][0]["containerPort"].as_u64().unwrap();
    assert_eq!(discover.port.map(u64::from), Some(container_port));
    // NAT: the pods need no VIP, no tunnel, no route.
    assert_eq!(vip.forwarding, balancer::config::Forwarding::Nat);
    // The balancer checks what the readiness probe checks, on the discovered port.
    let probe = &container["readinessProbe"]["httpGet"];
    let balancer::config::CheckKind::Http { path, .. } = &discover.health.kind else {
        panic!("an HTTP check: {:?}", discover.health.kind);
    };
    assert_eq!(path, text(&probe["path"], "probe path"));
    assert_eq!(u64::from(discover.health.port), container_port);
    assert_eq!(probe["port"].as_u64(), Some(container_port));
}

#[test]
fn the_hpa_scales_the_application_on_the_balancers_signal_through_the_adapter() {
    let docs = documents();
    let hpa = find(&docs, "HorizontalPodAutoscaler");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    let (deployment, _) = web_app(&docs);
    let target = &hpa["spec"]["scaleTargetRef"];
    assert_eq!(target["apiVersion"], deployment["apiVersion"]);
    assert_eq!(target["kind"], "Deployment");
    assert_eq!(target["name"], deployment["metadata"]["name"]);
    assert_eq!(
        hpa["metadata"]["namespace"],
        deployment["metadata"]["namespace"]
    );

    // The metric: one that the adapter's rules expose, for the VIP whose backends are the
    // Deployment's pods.
    let (vip, _) = discovering_vip(&docs);
    let autoscale = vip.autoscale.expect("the VIP's autoscale target");
    let metrics = hpa["spec"]["metrics"].as_sequence().unwrap();
    assert_eq!(
        metrics.len(),
        1,
        "one metric: the HPA takes the largest proposal"
    );
    assert_eq!(metrics[0]["type"], "External");
    let external = &metrics[0]["external"];
    let metric = text(&external["metric"]["name"], "metric name");
    assert_eq!(
        external["metric"]["selector"]["matchLabels"]["vip"],
        vip.name.as_str()
    );
    let rules = find_named(&docs, "ConfigMap", "prometheus-adapter-balancer-rules");
    let rules: Value =
        serde_yaml::from_str(text(&rules["data"]["config.yaml"], "config.yaml")).unwrap();
    let rules = rules["externalRules"].as_sequence().unwrap();
    let rule = rules
        .iter()
        .find(|r| r["name"]["as"] == metric)
        .unwrap_or_else(|| panic!("no adapter rule exposes {metric}"));

    // The HPA's desired = ceil(metric / averageValue) is the balancer's ceil(rate / target)
    // when the metric is the rate of the VIP's counter of the autoscale metric, over the
    // autoscale window, and averageValue is target_per_backend.
    let counter = format!(
        "balancer_vip_{}_total",
        autoscale.metric.name().strip_suffix("_per_second").unwrap()
    );
    let series = text(&rule["seriesQuery"], "seriesQuery");
    assert!(series.starts_with(&format!("{counter}{{")), "{series}");
    let query = text(&rule["metricsQuery"], "metricsQuery");
    assert!(
        query.starts_with("sum(rate("),
        "summed over the fleet: {query}"
    );
    let window = query
        .split_once("}[")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(window, _)| window)
        .unwrap_or_else(|| panic!("no rate window in {query}"));
    assert_eq!(
        balancer::config::health::parse_duration(window),
        Ok(autoscale.window),
        "the adapter's rate window is the VIP's autoscale window"
    );
    assert_eq!(external["target"]["type"], "AverageValue");
    let average: f64 = text(&external["target"]["averageValue"], "averageValue")
        .parse()
        .expect("a plain number");
    assert_eq!(average, autoscale.target_per_backend);
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
