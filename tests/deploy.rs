//! deploy/kubernetes/ agrees with weir: every manifest parses, there is one Deployment per stage
//! and per service of the config the manifests ship, each runs that stage (or that service's
//! executor) alone, its KEDA ScaledObject watches the consumer group and topic weir itself uses
//! (computed by the library from that config, so a renamed group or topic fails here), scales to
//! at most the topic's partitions (from topics/), and the pod waits for weir's drain and probes
//! the endpoints weir serves, on the port it listens on. No cluster and no kubectl needed.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize as _;
use serde_yaml_ng::Value;
use weir::config::Config;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

/// Every YAML file under `dir`, recursively, in name order.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The documents of a (multi-document) YAML file.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// Kubernetes objects (documents with `kind`) of the files under `dir`, by (kind, name).
fn objects(dir: &Path) -> BTreeMap<(String, String), Value> {
    let mut objects = BTreeMap::new();
    for path in yaml_files(dir) {
        if path.file_name().is_some_and(|n| n == "kustomization.yaml" || n == "weir.yaml") {
            continue;
        }
        for doc in documents(&path) {
            let kind = doc["kind"].as_str().unwrap_or_else(|| panic!("{}: a document without kind", path.display()));
            let name =
                doc["metadata"]["name"].as_str().unwrap_or_else(|| panic!("{}: {kind} without a name", path.display()));
            let previous = objects.insert((kind.to_string(), name.to_string()), doc.clone());
            assert!(previous.is_none(), "{}: {kind} {name} declared twice", path.display());
        }
    }
    objects
}

/// The config the manifests ship (the ConfigMap's weir.yaml), loaded as weir loads it.
fn shipped_config() -> Config {
    let config = Config::load(&deploy_dir().join("base/weir.yaml")).unwrap();
    weir::connectors::validate_all(&config).unwrap();
    config
}

/// The drain deadline of `config`: a `drain…` key wherever the config has it (issue 13's drain,
/// named by its own change), or weir's default of 30 s until that key exists.
fn drain_deadline(config: &Config) -> Duration {
    fn find(value: &Value) -> Option<&Value> {
        let map = value.as_mapping()?;
        map.iter()
            .find(|(k, v)| k.as_str().is_some_and(|k| k.contains("drain")) && !v.is_mapping())
            .map(|(_, v)| v)
            .or_else(|| map.values().find_map(find))
    }
    let value = serde_yaml_ng::to_value(config).unwrap();
    find(&value).map_or(Duration::from_secs(30), |v| weir::config::duration::deserialize(v.clone()).unwrap())
}

/// Partitions of each declared topic (topics/, the physical names under `config`).
fn partitions(config: &Config) -> BTreeMap<String, i64> {
    let specs = weir::kafka::topics::load_dir(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("topics")).unwrap();
    let declared: BTreeMap<String, i64> =
        specs.iter().map(|s| (config.names().topic(&s.name), s.partitions as i64)).collect();
    // `weir topics apply` derives an undeclared service topic with the partitions of `events`.
    let events = declared[&config.names().events()];
    let mut all = declared;
    for service in config.services.keys() {
        all.entry(config.names().actions(service)).or_insert(events);
    }
    all
}

/// A Deployment's name for a stage (and service): what the manifests call it.
fn deployment_name(stage: &weir::ops::status::StageGroups) -> String {
    match &stage.service {
        Some(service) => format!("weir-{}-{service}", stage.stage),
        None => format!("weir-{}", stage.stage),
    }
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or_else(|| panic!("expected an integer, found {v:?}"))
}

#[test]
fn every_manifest_parses_and_every_kustomization_names_files_that_exist() {
    let files = yaml_files(&deploy_dir());
    assert!(files.len() >= 8, "{files:?}");
    for path in &files {
        let docs = documents(path);
        assert!(!docs.is_empty(), "{} is empty", path.display());
        if path.file_name().is_some_and(|n| n == "kustomization.yaml") {
            let k = &docs[0];
            let dir = path.parent().unwrap();
            let mut referenced: Vec<&str> = Vec::new();
            for list in ["resources", "components"] {
                referenced.extend(k[list].as_sequence().into_iter().flatten().filter_map(Value::as_str));
            }
            referenced.extend(k["patches"].as_sequence().into_iter().flatten().filter_map(|p| p["path"].as_str()));
            for generator in ["configMapGenerator", "secretGenerator"] {
                for g in k[generator].as_sequence().into_iter().flatten() {
                    referenced.extend(g["files"].as_sequence().into_iter().flatten().filter_map(Value::as_str));
                }
            }
            for r in referenced {
                assert!(dir.join(r).exists(), "{}: {r} does not exist", path.display());
            }
        }
    }
    for overlay in ["overlays/dev", "overlays/prod"] {
        assert!(deploy_dir().join(overlay).join("kustomization.yaml").exists(), "{overlay}");
    }
}

#[test]
fn the_shipped_config_runs_the_services_of_the_repository_config() {
    let shipped = shipped_config();
    let repo = Config::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weir.yaml")).unwrap();
    assert_eq!(
        shipped.services.keys().collect::<Vec<_>>(),
        repo.services.keys().collect::<Vec<_>>(),
        "deploy/kubernetes/base/weir.yaml must run the services of weir.yaml (one Deployment each)"
    );
    let addr = shipped.metrics_addr.expect("the probes need the metrics endpoint");
    assert!(addr.ip().is_unspecified(), "metrics_addr {addr} must listen beyond loopback for the kubelet's probes");
}

#[test]
fn one_deployment_per_stage_and_service_matching_weirs_names() {
    let config = shipped_config();
    let base = objects(&deploy_dir().join("base"));
    let stages = weir::ops::status::layout(&config);
    let partitions = partitions(&config);
    let drain = drain_deadline(&config);
    let port = config.metrics_addr.unwrap().port() as i64;

    let expected: BTreeSet<String> = stages.iter().map(deployment_name).collect();
    let deployments: BTreeSet<String> =
        base.keys().filter(|(kind, _)| kind == "Deployment").map(|(_, name)| name.clone()).collect();
    assert_eq!(deployments, expected, "one Deployment per stage and per service");

    for stage in &stages {
        let name = deployment_name(stage);
        let main = &stage.groups[0];
        let d = &base[&("Deployment".to_string(), name.clone())];
        let pod = &d["spec"]["template"]["spec"];
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        assert_eq!(&d["spec"]["selector"]["matchLabels"], labels, "{name}: the selector selects its own pods");

        // It runs this stage, and for an executor this service only.
        let containers = pod["containers"].as_sequence().unwrap();
        assert_eq!(containers.len(), 1, "{name}");
        let c = &containers[0];
        let args: Vec<&str> = c["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        let mut want = vec!["run", "--stage", stage.stage.as_str()];
        if let Some(service) = &stage.service {
            want.extend(["--service", service.as_str()]);
        }
        assert_eq!(args, want, "{name}: command");

        // The drain fits in the grace period.
        let grace = int(&pod["terminationGracePeriodSeconds"]);
        assert!(
            grace as u64 > drain.as_secs(),
            "{name}: terminationGracePeriodSeconds {grace} must exceed the drain deadline {drain:?}"
        );

        // Probes on weir's endpoints and port.
        let ports = c["ports"].as_sequence().unwrap();
        let named = |port_name: &Value| -> i64 {
            match port_name.as_str() {
                Some(n) => int(&ports.iter().find(|p| p["name"].as_str() == Some(n)).unwrap()["containerPort"]),
                None => int(port_name),
            }
        };
        for (probe, path) in [("livenessProbe", "/health/live"), ("readinessProbe", "/health/ready")] {
            let get = &c[probe]["httpGet"];
            assert_eq!(get["path"].as_str(), Some(path), "{name}: {probe}");
            assert_eq!(named(&get["port"]), port, "{name}: {probe} port is metrics_addr's");
        }

        // Static membership under the pod's name; the config from the ConfigMap.
        let env = c["env"].as_sequence().unwrap();
        let var =
            |n: &str| env.iter().find(|e| e["name"].as_str() == Some(n)).unwrap_or_else(|| panic!("{name}: no {n}"));
        assert_eq!(var("WEIR_INSTANCE_ID")["valueFrom"]["fieldRef"]["fieldPath"].as_str(), Some("metadata.name"));
        let config_path = var("WEIR_CONFIG")["value"].as_str().unwrap();
        let mount =
            c["volumeMounts"].as_sequence().unwrap().iter().find(|m| m["mountPath"].as_str() == Some(config_path));
        let volume =
            mount.unwrap_or_else(|| panic!("{name}: nothing mounted at {config_path}"))["name"].as_str().unwrap();
        let volume = pod["volumes"].as_sequence().unwrap().iter().find(|v| v["name"].as_str() == Some(volume)).unwrap();
        assert_eq!(volume["configMap"]["name"].as_str(), Some("weir-config"), "{name}");
        let needs_database = stage.stage == "sink";
        assert_eq!(
            env.iter().any(|e| e["name"].as_str() == Some("DATABASE_URL")),
            needs_database,
            "{name}: DATABASE_URL"
        );

        // A disruption budget for its pods.
        let pdb = &base[&("PodDisruptionBudget".to_string(), name.clone())];
        for (k, v) in pdb["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
            assert_eq!(&labels[k.as_str().unwrap()], v, "{name}: the PodDisruptionBudget selects its pods");
        }

        // The autoscaler watches weir's own group and topic, and stops at the partitions.
        let so = &base[&("ScaledObject".to_string(), name.clone())];
        assert_eq!(so["spec"]["scaleTargetRef"]["name"].as_str(), Some(name.as_str()));
        let triggers = so["spec"]["triggers"].as_sequence().unwrap();
        assert_eq!(triggers.len(), 1, "{name}");
        let t = &triggers[0];
        assert_eq!(t["type"].as_str(), Some("kafka"), "{name}");
        assert_eq!(t["metadata"]["consumerGroup"].as_str(), Some(main.group.as_str()), "{name}: consumerGroup");
        assert_eq!(t["metadata"]["topic"].as_str(), Some(main.topic.as_str()), "{name}: topic");
        let max = int(&so["spec"]["maxReplicaCount"]);
        assert!(int(&so["spec"]["minReplicaCount"]) <= max, "{name}");
        assert!(
            max <= partitions[&main.topic],
            "{name}: maxReplicaCount {max} > {} partitions of {}",
            partitions[&main.topic],
            main.topic
        );
    }
}

#[test]
fn overlays_keep_the_invariants() {
    let config = shipped_config();
    let base = objects(&deploy_dir().join("base"));
    let partitions = partitions(&config);
    let drain = drain_deadline(&config);
    for overlay in ["overlays/dev", "overlays/prod"] {
        for ((kind, name), patch) in objects(&deploy_dir().join(overlay)) {
            let target = base.get(&(kind.clone(), name.clone()));
            let target = target.unwrap_or_else(|| panic!("{overlay}: patches {kind} {name}, which base does not have"));
            match kind.as_str() {
                "ScaledObject" => {
                    let effective = |field: &str| {
                        int(if patch["spec"][field].is_null() { &target["spec"][field] } else { &patch["spec"][field] })
                    };
                    let topic = target["spec"]["triggers"][0]["metadata"]["topic"].as_str().unwrap();
                    let (min, max) = (effective("minReplicaCount"), effective("maxReplicaCount"));
                    assert!(
                        min <= max && max <= partitions[topic],
                        "{overlay}: {name} replicas {min}..{max}, {topic} has {}",
                        partitions[topic]
                    );
                    assert!(
                        patch["spec"]["triggers"].is_null(),
                        "{overlay}: {name}: triggers belong to base, where they are checked"
                    );
                }
                "Deployment" => {
                    let pod = &patch["spec"]["template"]["spec"];
                    if let Some(grace) = pod["terminationGracePeriodSeconds"].as_i64() {
                        assert!(grace as u64 > drain.as_secs(), "{overlay}: {name} grace period {grace}");
                    }
                    assert!(
                        pod["containers"].as_sequence().into_iter().flatten().all(|c| c["args"].is_null()),
                        "{overlay}: {name}: the command belongs to base"
                    );
                }
                _ => {}
            }
        }
    }
}
