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
use weir::config::{Config, Priority};

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

/// Partitions of each topic `weir topics apply` creates from topics/ for `config`: those declared
/// and those it derives (a service's priority, overflow and delay topics), by physical name.
fn partitions(config: &Config) -> BTreeMap<String, i64> {
    let mut specs = weir::kafka::topics::load_dir(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("topics")).unwrap();
    let derived = weir::kafka::topics::service_topics(config, &specs).unwrap();
    specs.extend(derived);
    specs.iter().map(|s| (config.names().topic(&s.name), s.partitions as i64)).collect()
}

/// The (consumer group, topic) pairs a stage's autoscaler must watch: an executor's one per
/// priority (each priority's action topic has a group of its own), another stage's main group.
fn lag_sources(config: &Config, stage: &weir::ops::status::StageGroups) -> BTreeSet<(String, String)> {
    let names = config.names();
    match &stage.service {
        Some(service) => {
            Priority::ALL.iter().map(|p| (names.execute_group_at(service, *p), names.actions_at(service, *p))).collect()
        }
        None => [(stage.groups[0].group.clone(), stage.groups[0].topic.clone())].into(),
    }
}

/// The (consumer group, topic) pairs of a ScaledObject's Kafka triggers.
fn triggers(so: &Value) -> BTreeSet<(String, String)> {
    let triggers = so["spec"]["triggers"].as_sequence().expect("triggers");
    let pairs: BTreeSet<(String, String)> = triggers
        .iter()
        .map(|t| {
            assert_eq!(t["type"].as_str(), Some("kafka"), "{t:?}");
            let field =
                |k: &str| t["metadata"][k].as_str().unwrap_or_else(|| panic!("a trigger without {k}")).to_string();
            (field("consumerGroup"), field("topic"))
        })
        .collect();
    assert_eq!(pairs.len(), triggers.len(), "a trigger repeated: {triggers:?}");
    pairs
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

        // The autoscaler watches weir's own groups and topics (an executor's: one per priority),
        // and stops at the partitions of the smallest.
        let so = &base[&("ScaledObject".to_string(), name.clone())];
        assert_eq!(so["spec"]["scaleTargetRef"]["name"].as_str(), Some(name.as_str()));
        let watched = triggers(so);
        assert_eq!(watched, lag_sources(&config, stage), "{name}: the triggers' consumerGroup and topic");
        assert!(watched.contains(&(main.group.clone(), main.topic.clone())), "{name}: the main group is watched");
        let max = int(&so["spec"]["maxReplicaCount"]);
        assert!(int(&so["spec"]["minReplicaCount"]) <= max, "{name}");
        for (_, topic) in &watched {
            assert!(
                max <= partitions[topic],
                "{name}: maxReplicaCount {max} > {} partitions of {topic}",
                partitions[topic]
            );
        }
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
                    let (min, max) = (effective("minReplicaCount"), effective("maxReplicaCount"));
                    for (_, topic) in triggers(target) {
                        assert!(
                            min <= max && max <= partitions[&topic],
                            "{overlay}: {name} replicas {min}..{max}, {topic} has {}",
                            partitions[&topic]
                        );
                    }
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

// ---------------------------------------------------------------------------------------------
// The image (Dockerfile). No Docker engine runs where these tests run, so the image is never
// built here: this checks that the file agrees with the manifests and with scripts/setup.sh.
// ---------------------------------------------------------------------------------------------

fn repo_file(rel: &str) -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

/// A Dockerfile instruction's keyword (upper case) and its arguments on one line.
fn instruction(i: &dockerfile_parser::Instruction) -> (String, String) {
    use dockerfile_parser::Instruction as I;
    let exec_or_shell = |e: &dockerfile_parser::ShellOrExecExpr| match e {
        dockerfile_parser::ShellOrExecExpr::Exec(a) => a.as_str_vec().join(" "),
        dockerfile_parser::ShellOrExecExpr::Shell(s) => s.to_string(),
    };
    match i {
        I::From(f) => ("FROM".into(), f.image.content.clone()),
        I::Run(r) => ("RUN".into(), exec_or_shell(&r.expr)),
        I::Entrypoint(e) => ("ENTRYPOINT".into(), exec_or_shell(&e.expr)),
        I::Cmd(c) => ("CMD".into(), exec_or_shell(&c.expr)),
        I::Env(e) => ("ENV".into(), e.vars.iter().map(|v| format!("{}={}", v.key.content, v.value)).collect()),
        I::Misc(m) => (m.instruction.content.to_uppercase(), m.arguments.to_string().trim().to_string()),
        other => (format!("{other:?}").split('(').next().unwrap().to_uppercase(), String::new()),
    }
}

/// Each Deployment of base's pod spec and its one container.
fn pods(base: &BTreeMap<(String, String), Value>) -> Vec<(String, &Value, &Value)> {
    base.iter()
        .filter(|((kind, _), _)| kind == "Deployment")
        .map(|((_, name), d)| {
            let pod = &d["spec"]["template"]["spec"];
            (name.clone(), pod, &pod["containers"][0])
        })
        .collect()
}

#[test]
fn the_dockerfile_builds_what_the_manifests_run() {
    let text = repo_file("Dockerfile");
    let dockerfile = dockerfile_parser::Dockerfile::parse(&text).unwrap();
    let stages: Vec<Vec<(String, String)>> =
        dockerfile.iter_stages().map(|s| s.instructions.iter().map(|i| instruction(i)).collect()).collect();
    assert!(stages.len() >= 2, "a multi-stage build: a build stage and a slim runtime stage");
    let (build, runtime) = (&stages[0], stages.last().unwrap());
    let all = |stage: &[(String, String)], keyword: &str| -> Vec<String> {
        stage.iter().filter(|(k, _)| k == keyword).map(|(_, a)| a.clone()).collect()
    };

    // The build stage installs what scripts/setup.sh installs for a build (not Java and Maven,
    // which are the local test broker's) and builds the weir binary.
    let setup = repo_file("scripts/setup.sh");
    let packages: Vec<&str> = setup
        .lines()
        .filter_map(|l| Some(l.split("missing+=(").nth(1)?.split(')').next()?.trim()))
        .filter(|p| !p.starts_with("openjdk") && *p != "maven")
        .collect();
    assert!(packages.contains(&"cmake") && packages.contains(&"libcurl4-openssl-dev"), "{packages:?}");
    let runs = all(build, "RUN").join("\n");
    for package in &packages {
        assert!(runs.split_whitespace().any(|w| w == *package), "the build stage installs {package}: {runs}");
    }
    assert!(runs.contains("cargo build --release") && runs.contains("--bin weir"), "{runs}");

    // The runtime stage: the metrics port the probes use, the config path the pods mount, the
    // user they run as, and `weir` as the entrypoint (the manifests give only its arguments).
    let config = shipped_config();
    let port = config.metrics_addr.unwrap().port().to_string();
    let exposed = all(runtime, "EXPOSE").join(" ");
    assert!(exposed.split_whitespace().any(|p| p.trim_end_matches("/tcp") == port), "EXPOSE {port}: {exposed}");
    let env = all(runtime, "ENV").join(" ");
    let user = all(runtime, "USER");
    let user = user.last().expect("a USER: the image does not run as root");
    let (uid, gid) = user.split_once(':').unwrap_or((user, user));
    let entrypoint = all(runtime, "ENTRYPOINT");
    let entrypoint = entrypoint.last().expect("an ENTRYPOINT");
    assert_eq!(Path::new(entrypoint.split_whitespace().next().unwrap()).file_name().unwrap(), "weir", "{entrypoint}");

    let base = objects(&deploy_dir().join("base"));
    for (name, pod, c) in pods(&base) {
        assert!(c["command"].is_null(), "{name}: the image's entrypoint runs; the manifest gives args only");
        let env_var = |n: &str| {
            let vars = c["env"].as_sequence().unwrap();
            vars.iter().find(|e| e["name"].as_str() == Some(n)).and_then(|e| e["value"].as_str()).map(str::to_string)
        };
        let config_path = env_var("WEIR_CONFIG").unwrap_or_else(|| panic!("{name}: WEIR_CONFIG"));
        assert!(env.contains(&format!("WEIR_CONFIG={config_path}")), "{name}: the image's WEIR_CONFIG is {env}");
        let security = &pod["securityContext"];
        assert_eq!(security["runAsNonRoot"].as_bool(), Some(true), "{name}");
        assert_eq!(int(&security["runAsUser"]).to_string(), uid, "{name}: runAsUser is the image's USER {user}");
        assert_eq!(int(&security["runAsGroup"]).to_string(), gid, "{name}: runAsGroup is the image's USER {user}");
    }

    // The image name: what the Dockerfile's build command tags is what kustomize makes of the
    // image the Deployments name.
    let tagged = text
        .lines()
        .find_map(|l| l.trim_start_matches('#').trim().strip_prefix("docker build -t "))
        .expect("the Dockerfile's header gives its build command");
    let tagged = tagged.split_whitespace().next().unwrap();
    let repository = tagged.rsplit_once(':').map_or(tagged, |(r, _)| r);
    let kustomization = &documents(&deploy_dir().join("base/kustomization.yaml"))[0];
    for (name, _, c) in pods(&base) {
        let image = c["image"].as_str().unwrap();
        let images = kustomization["images"].as_sequence().unwrap();
        let mapped = images.iter().find(|i| i["name"].as_str() == Some(image));
        let mapped = mapped.unwrap_or_else(|| panic!("{name}: kustomization.yaml does not name image {image}"));
        assert_eq!(mapped["newName"].as_str(), Some(repository), "{name}: image {image} is what the Dockerfile builds");
    }
}
