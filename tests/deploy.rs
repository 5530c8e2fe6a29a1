//! The operator kit under deploy/ against the real binary and the real tools: every metric name
//! the Grafana dashboard (deploy/grafana/geobeat.json) and the Prometheus rules
//! (deploy/prometheus/rules.yml) use is one the server exports, with a type that fits how the
//! query uses it, and every label they group or match by exists; `promtool check rules` and
//! `promtool test rules` pass; the Kubernetes manifests validate offline against the
//! Kubernetes schemas (`kubernetes-validate`, PyPI); the compose file and the systemd unit are
//! consistent with the server's flags; the container image's root filesystem runs the server as
//! its non-root user (chroot in a private mount namespace) and answers its health check, and the
//! Containerfile builds with podman into the image the manifests expect.
//!
//! Tools: promtool (Debian package prometheus), python3 with PyYAML and kubernetes-validate,
//! podman, unshare and chroot (.ci/run installs what is missing); the container tests need root.
//! A missing tool fails the test with a message naming it.

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(rel)
}

/// Series named by exporters other than geobeat that the rules may use: Prometheus's own `up`
/// and node_exporter's filesystem figures (geobeat exports log sizes, not free space).
const FOREIGN_METRICS: &[&str] = &[
    "up",
    "node_filesystem_avail_bytes",
    "node_filesystem_size_bytes",
];
/// Labels that come from the scrape target or from node_exporter, not from geobeat.
const FOREIGN_LABELS: &[&str] = &["job", "instance", "mountpoint", "fstype", "le"];

/// What a scrape of the real server holds: sample names, family types and label names.
#[derive(Debug, Default)]
struct Scrape {
    /// Every sample name (`geobeat_frames_in_total`, `geobeat_ack_latency_seconds_bucket`, ...).
    samples: BTreeSet<String>,
    /// Family name (as in `# TYPE`) to its type.
    types: BTreeMap<String, String>,
    /// Every label name on any sample.
    labels: BTreeSet<String>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut s = Scrape::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').expect("# TYPE name type");
                s.types.insert(name.to_string(), ty.to_string());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let end = line.find(['{', ' ']).expect("sample line has a value");
            s.samples.insert(line[..end].to_string());
            if line[end..].starts_with('{') {
                let close = line.rfind('}').expect("closing brace");
                for pair in split_labels(&line[end + 1..close]) {
                    let (k, _) = pair.split_once('=').expect("label=value");
                    s.labels.insert(k.to_string());
                }
            }
        }
        s
    }

    /// The type of the family a sample name belongs to: a counter's `_total`, a histogram's
    /// `_bucket`/`_sum`/`_count` are mapped back to their family only when that family has that
    /// type (so a gauge that happens to end in `_count` stays a gauge).
    fn kind(&self, sample: &str) -> Option<&str> {
        if let Some(t) = self.types.get(sample) {
            // Classic text names counter families with `_total`; OpenMetrics without.
            return Some(t);
        }
        if let Some(f) = sample.strip_suffix("_total") {
            if self.types.get(f).map(String::as_str) == Some("counter") {
                return Some("counter");
            }
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(f) = sample.strip_suffix(suffix) {
                if self.types.get(f).map(String::as_str) == Some("histogram") {
                    return Some("histogram");
                }
            }
        }
        None
    }
}

/// Splits `a="x",b="y, z"` at the commas outside quotes.
fn split_labels(s: &str) -> Vec<&str> {
    let (mut out, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

/// What one PromQL expression refers to.
#[derive(Debug, Default, PartialEq)]
struct Refs {
    /// Metric names (identifiers that are neither functions, keywords, labels nor strings).
    metrics: BTreeSet<String>,
    /// Names passed straight to `rate`, `irate` or `increase` (must be counters).
    rated: BTreeSet<String>,
    /// Label names in `by (...)`, `without (...)`, `on (...)`, `ignoring (...)`, `group_left`,
    /// `group_right` and selector matchers.
    labels: BTreeSet<String>,
}

/// PromQL keywords and the functions and aggregations the deploy files may use.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "topk",
    "bottomk",
    "quantile",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "rate",
    "irate",
    "increase",
    "deriv",
    "delta",
    "changes",
    "resets",
    "histogram_quantile",
    "time",
    "label_values",
    "predict_linear",
    "abs",
    "clamp_min",
    "clamp_max",
    "max_over_time",
    "min_over_time",
    "avg_over_time",
    "absent",
    "vector",
    "scalar",
    "inf",
    "nan",
];

fn refs(expr: &str) -> Refs {
    // Grafana's `label_values(selector, label)` (template variables): a selector and a label.
    if let Some(inner) = expr
        .trim()
        .strip_prefix("label_values(")
        .and_then(|x| x.strip_suffix(')'))
    {
        let (selector, label) = inner.rsplit_once(',').unwrap_or((inner, ""));
        let mut r = refs(selector);
        r.labels.extend(
            Some(label.trim())
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
        return r;
    }
    let b = expr.as_bytes();
    let mut r = Refs::default();
    let (mut i, mut brace_depth) = (0, 0usize);
    let is_start = |c: u8| c.is_ascii_alphabetic() || c == b'_' || c == b':';
    let is_part = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' {
            i += 1;
            while i < b.len() && b[i] != c {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            continue;
        }
        if c == b'$' {
            // Grafana variables: $__rate_interval, $instance.
            i += 1;
            while i < b.len() && is_part(b[i]) {
                i += 1;
            }
            continue;
        }
        if c == b'[' {
            // Range or subquery durations: [5m], [$__rate_interval], [30m:1m].
            while i < b.len() && b[i] != b']' {
                i += 1;
            }
            continue;
        }
        if c == b'{' {
            brace_depth += 1;
        } else if c == b'}' {
            brace_depth = brace_depth.saturating_sub(1);
        }
        if c.is_ascii_digit() {
            // Numbers, including 1e3 and durations after offset (5m).
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
            continue;
        }
        if !is_start(c) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && is_part(b[i]) {
            i += 1;
        }
        let word = &expr[start..i];
        let rest = expr[i..].trim_start();
        if brace_depth > 0 {
            // Inside a selector every identifier is a label name (values are strings).
            r.labels.insert(word.to_string());
        } else if [
            "by",
            "without",
            "on",
            "ignoring",
            "group_left",
            "group_right",
        ]
        .contains(&word)
            && rest.starts_with('(')
        {
            let close = rest.find(')').expect("closing parenthesis");
            for l in rest[1..close]
                .split(',')
                .map(str::trim)
                .filter(|l| !l.is_empty())
            {
                r.labels.insert(l.to_string());
            }
            i = expr.len() - rest.len() + close + 1;
        } else if !PROMQL_WORDS.contains(&word) {
            // Not a function, aggregation or keyword: a metric name.
            r.metrics.insert(word.to_string());
            let before = expr[..start].trim_end();
            if ["rate(", "irate(", "increase("]
                .iter()
                .any(|f| before.ends_with(f))
            {
                r.rated.insert(word.to_string());
            }
        }
    }
    r
}

/// Every PromQL expression in the dashboard: panel targets, template variable queries and
/// annotation queries.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query", serde_json::Value::String(s)) if s.contains('(') => {
                        out.push(s.clone())
                    }
                    _ => dashboard_exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| dashboard_exprs(x, out)),
        _ => {}
    }
}

/// A YAML file as JSON, through python3's PyYAML (a dependency of kubernetes-validate).
fn yaml_docs(path: &Path) -> Vec<serde_json::Value> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(path)
        .output()
        .expect("python3 must be installed");
    assert!(
        out.status.success(),
        "reading {} with PyYAML failed (python3 -m pip install pyyaml): {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The rules file's expressions and the names it records.
fn rules_exprs() -> (Vec<(String, String)>, BTreeSet<String>) {
    let docs = yaml_docs(&deploy("prometheus/rules.yml"));
    let mut exprs = Vec::new();
    let mut recorded = BTreeSet::new();
    for group in docs[0]["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["record"]
                .as_str()
                .or(rule["alert"].as_str())
                .expect("record or alert")
                .to_string();
            if let Some(rec) = rule["record"].as_str() {
                recorded.insert(rec.to_string());
            }
            exprs.push((name, rule["expr"].as_str().expect("expr").to_string()));
        }
    }
    (exprs, recorded)
}

/// Starts the server with an audit sink, ingests heartbeats for devices on both shards (and
/// one refused heartbeat) so that per-executor, per-shard, per-reason and per-sink series all
/// exist, and returns the scrape in both formats (classic text, OpenMetrics).
fn scrape_real_server() -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit");
    let config = dir.path().join("geobeat.toml");
    std::fs::write(
        &config,
        format!(
            "[[sinks]]\nname = \"archive\"\nkind = \"audit\"\ndir = \"{}\"\npoll_interval_ms = 20\n",
            audit.display()
        ),
    )
    .unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--config", &config.display().to_string()],
    );
    let tok = server.token(&["gateway", "d-"]);
    let mut ws = ws_connect(&server, &tok).unwrap();
    let t = now_ms();
    for seq in 1..=32u64 {
        // d-0..d-15 spread over both shards.
        let f = format!(
            r#"{{"seq":{seq},"id":"d-{}","lat":1,"lon":2,"ts":{}}}"#,
            seq % 16,
            t + seq as i64
        );
        ws.send(Message::text(f)).unwrap();
    }
    let bad = format!(r#"{{"seq":33,"id":"d-1","lat":100,"lon":2,"ts":{t}}}"#);
    ws.send(Message::text(bad)).unwrap();
    let ok = format!(r#"{{"seq":34,"id":"d-2","lat":1,"lon":2,"ts":{}}}"#, t + 40);
    ws.send(Message::text(ok)).unwrap();
    let errors = wait_ack(&mut ws, 34);
    assert_eq!(errors.len(), 1, "one refusal expected: {errors:?}");
    // The sink's first successful pass sets its last-success time.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (st, body) = server.get("/metrics", None);
        assert_eq!(st, 200);
        if body.contains("geobeat_sink_last_success_timestamp_seconds{") {
            break;
        }
        assert!(Instant::now() < deadline, "sink series never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    let classic = server.get("/metrics", None).1;
    let request = "GET /metrics HTTP/1.1\r\nhost: x\r\naccept: application/openmetrics-text; version=1.0.0\r\nconnection: close\r\n\r\n";
    let (st, openmetrics) = raw_http(server.addr, request.as_bytes()).unwrap();
    assert_eq!(st, 200);
    assert!(openmetrics.ends_with("# EOF\n"), "not OpenMetrics");
    (classic, openmetrics)
}

/// Checks expressions against a scrape; returns one line per problem.
fn problems(
    exprs: &[(String, String)],
    scrape: &Scrape,
    recorded: &BTreeSet<String>,
) -> Vec<String> {
    let mut bad = Vec::new();
    for (place, expr) in exprs {
        let r = refs(expr);
        for m in &r.metrics {
            let known = if m.contains(':') {
                recorded.contains(m)
            } else {
                scrape.samples.contains(m) || FOREIGN_METRICS.contains(&m.as_str())
            };
            if !known {
                bad.push(format!("{place}: {m} is not exported (expr: {expr})"));
            }
        }
        for m in &r.rated {
            if scrape.samples.contains(m)
                && !matches!(scrape.kind(m), Some("counter" | "histogram"))
                || m.ends_with("_bucket") && scrape.kind(m) != Some("histogram")
            {
                bad.push(format!(
                    "{place}: rate/increase of {m}, a {:?} (expr: {expr})",
                    scrape.kind(m)
                ));
            }
        }
        for l in &r.labels {
            if !scrape.labels.contains(l) && !FOREIGN_LABELS.contains(&l.as_str()) {
                bad.push(format!("{place}: label {l} is on no series (expr: {expr})"));
            }
        }
    }
    bad
}

#[test]
fn promql_reader_finds_metrics_labels_and_rates() {
    // The expression reader behind the name check: metric names outside strings, selectors and
    // grouping clauses; labels inside them; Grafana variables, durations and numbers ignored.
    let r = refs(
        r#"histogram_quantile(0.99, sum by (instance, le) (rate(geobeat_ack_latency_seconds_bucket{instance=~"$instance", job="geobeat_x"}[$__rate_interval]))) > 64 * 1024 and on (job) geobeat:x:rate5m offset 5m"#,
    );
    assert_eq!(
        r.metrics,
        BTreeSet::from([
            "geobeat_ack_latency_seconds_bucket".to_string(),
            "geobeat:x:rate5m".to_string()
        ])
    );
    assert_eq!(
        r.rated,
        BTreeSet::from(["geobeat_ack_latency_seconds_bucket".to_string()])
    );
    assert_eq!(
        r.labels,
        BTreeSet::from(["instance", "le", "job"].map(String::from))
    );
    let v = refs(r#"label_values(geobeat_build_info{job=~"$job"}, instance)"#);
    assert_eq!(
        (v.metrics, v.labels),
        (
            BTreeSet::from(["geobeat_build_info".to_string()]),
            BTreeSet::from(["job".to_string(), "instance".to_string()])
        )
    );
    // A misspelt name, a rate of a gauge and an unknown label are each reported.
    let scrape = Scrape::parse(
        "# TYPE geobeat_log_bytes gauge\ngeobeat_log_bytes{shard=\"0\"} 1\n\
         # TYPE geobeat_frames_in counter\ngeobeat_frames_in_total{executor=\"0\"} 3\n",
    );
    assert_eq!(scrape.kind("geobeat_frames_in_total"), Some("counter"));
    assert_eq!(scrape.kind("geobeat_log_bytes"), Some("gauge"));
    let exprs = [
        (
            "ok".to_string(),
            "sum by (shard) (geobeat_log_bytes) + on () sum(rate(geobeat_frames_in_total[5m]))"
                .to_string(),
        ),
        ("typo".to_string(), "geobeat_log_byte".to_string()),
        (
            "gauge".to_string(),
            "rate(geobeat_log_bytes[5m])".to_string(),
        ),
        (
            "label".to_string(),
            "sum by (shrd) (geobeat_log_bytes)".to_string(),
        ),
        ("record".to_string(), "geobeat:nope".to_string()),
    ];
    let found = problems(&exprs, &scrape, &BTreeSet::new());
    let places: Vec<&str> = found.iter().map(|p| p.split(':').next().unwrap()).collect();
    assert_eq!(places, ["typo", "gauge", "label", "record"], "{found:#?}");
}

#[test]
fn dashboard_and_rules_use_only_exported_metrics() {
    // Scrape the real binary (both formats), then check every expression of the dashboard and
    // the rules: each geobeat_*/process_* name is a sample the server exports, rate() only
    // reads counters and histogram parts, each `geobeat:*` name is recorded by the rules, and
    // each label grouped or matched on exists.
    let (classic, openmetrics) = scrape_real_server();
    let (rule_exprs, recorded) = rules_exprs();
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/geobeat.json")).unwrap())
            .expect("dashboard is JSON");
    let mut dash_exprs = Vec::new();
    dashboard_exprs(&dash, &mut dash_exprs);
    assert!(
        dash_exprs.len() >= 30,
        "dashboard expressions: {}",
        dash_exprs.len()
    );
    let mut all: Vec<(String, String)> = rule_exprs
        .iter()
        .map(|(n, e)| (format!("rules.yml {n}"), e.clone()))
        .collect();
    all.extend(
        dash_exprs
            .iter()
            .map(|e| ("geobeat.json".to_string(), e.clone())),
    );
    // Every family the issue asks the dashboard to show is on it.
    let used: BTreeSet<String> = all.iter().flat_map(|(_, e)| refs(e).metrics).collect();
    for family in [
        "geobeat_heartbeats_accepted_total",
        "geobeat_heartbeats_rejected_total",
        "geobeat_ack_latency_seconds_bucket",
        "geobeat_commit_latency_seconds_bucket",
        "geobeat_commit_group_entries_bucket",
        "geobeat_connections_open",
        "geobeat_queue_depth",
        "geobeat_cross_shard_messages_total",
        "geobeat_sink_backlog_bytes",
        "geobeat_sink_failures_total",
        "geobeat_last_location_devices",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(used.contains(family), "{family} is on no panel or rule");
    }
    for (format, text) in [("classic", &classic), ("OpenMetrics", &openmetrics)] {
        let scrape = Scrape::parse(text);
        assert!(scrape.samples.len() > 30, "{format}: {:?}", scrape.samples);
        let found = problems(&all, &scrape, &recorded);
        assert!(found.is_empty(), "{format} scrape:\n{}", found.join("\n"));
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (.ci/run installs the tools)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    // promtool lints the rules (syntax, templates) and runs rules_test.yml, where every alert
    // fires on a bad history and stays quiet on a healthy one.
    let out = run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(deploy("prometheus/rules.yml")));
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run(Command::new("promtool")
        .args(["test", "rules"])
        .arg(deploy("prometheus/rules_test.yml")));
    assert!(out.contains("SUCCESS"), "{out}");
    // Every alert in the rules has a unit test.
    let (exprs, recorded) = rules_exprs();
    let tests = std::fs::read_to_string(deploy("prometheus/rules_test.yml")).unwrap();
    for (name, _) in exprs.iter().filter(|(n, _)| !recorded.contains(n)) {
        assert!(
            tests.contains(&format!("alertname: {name}\n")),
            "alert {name} has no test in rules_test.yml"
        );
    }
}

// ----- Item 2: compose, Kubernetes, systemd. -----

/// The long flags `geobeat serve --help` documents.
fn serve_flags() -> BTreeSet<String> {
    let help = run(Command::new(bin()).args(["serve", "--help"]));
    help.split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| format!("--{}", w.trim_end_matches([',', '.', ')', '`'])))
        .collect()
}

/// Every `--flag` among `args` (a `--flag=value` counts as `--flag`) is one `serve` knows.
fn assert_known_flags(place: &str, args: &[String], known: &BTreeSet<String>) {
    for a in args.iter().filter(|a| a.starts_with("--")) {
        let flag = a.split('=').next().unwrap();
        assert!(known.contains(flag), "{place}: unknown flag {flag}");
    }
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected a list, got {v}"))
        .iter()
        .map(|x| x.as_str().expect("string").to_string())
        .collect()
}

/// All documents of deploy/k8s/*.yaml, with their file names.
fn k8s_docs() -> Vec<(String, serde_json::Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy("k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            let name = f.file_name().unwrap().to_string_lossy().to_string();
            yaml_docs(f)
                .into_iter()
                .filter(|d| !d.is_null())
                .map(move |d| (name.clone(), d))
        })
        .collect()
}

fn kubernetes_validate(files: &[PathBuf]) -> std::process::Output {
    Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", "1.29.0"])
        .args(files)
        .output()
        .expect("kubernetes-validate (python3 -m pip install kubernetes-validate; .ci/run does)")
}

#[test]
fn kubernetes_manifests_validate_offline_and_fit_the_server() {
    // kubernetes-validate (strict: unknown fields are errors) passes every document of
    // deploy/k8s against the Kubernetes 1.29 schemas, and fails on a broken copy (so a pass
    // means something: an empty file, for one, passes silently, hence the count). Then the
    // pieces fit together and fit the server: the StatefulSet's service is the headless Service,
    // each pod gets a claim, probes hit /healthz and /readyz, io_uring's seccomp profile is
    // Localhost, the PDB selects the pods, the ConfigMap and Secret it names exist, and its
    // arguments are flags `geobeat serve` knows.
    let docs = k8s_docs();
    let files: Vec<PathBuf> = std::fs::read_dir(deploy("k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    let out = kubernetes_validate(&files);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubernetes-validate failed:\n{text}");
    assert_eq!(
        text.matches(" passed for resource ").count(),
        docs.len(),
        "every document validated:\n{text}"
    );
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("statefulset.yaml");
    let sts_text = std::fs::read_to_string(deploy("k8s/statefulset.yaml")).unwrap();
    std::fs::write(
        &broken,
        sts_text.replacen("  serviceName: geobeat", "  serviceNme: geobeat", 1),
    )
    .unwrap();
    assert!(
        !kubernetes_validate(&[broken]).status.success(),
        "a misspelt field must fail validation"
    );

    let find = |kind: &str| -> &serde_json::Value {
        &docs
            .iter()
            .find(|(_, d)| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in deploy/k8s"))
            .1
    };
    let sts = find("StatefulSet");
    let svc = find("Service");
    let pdb = find("PodDisruptionBudget");
    let cm = find("ConfigMap");
    let secret = find("Secret");
    assert_eq!(svc["spec"]["clusterIP"], "None", "headless service");
    assert_eq!(sts["spec"]["serviceName"], svc["metadata"]["name"]);
    let pod = &sts["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    for selector in [
        &sts["spec"]["selector"]["matchLabels"],
        &pdb["spec"]["selector"]["matchLabels"],
        &svc["spec"]["selector"],
    ] {
        for (k, v) in selector.as_object().expect("selector") {
            assert_eq!(&labels[k], v, "selector {k} matches the pod");
        }
    }
    let claims = sts["spec"]["volumeClaimTemplates"]
        .as_array()
        .expect("claims");
    assert_eq!(claims.len(), 1, "one volume per pod");
    let c = &pod["spec"]["containers"][0];
    let data_mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == claims[0]["metadata"]["name"])
        .expect("the claim is mounted");
    assert_eq!(
        pod["spec"]["securityContext"]["seccompProfile"]["type"],
        "Localhost"
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    let args = strings(&c["args"]);
    assert_eq!(args[0], "serve");
    assert_known_flags("statefulset", &args, &serve_flags());
    // The ConfigMap is mounted where --config points, and the Secret feeds GEOBEAT_SECRET.
    let config_arg = &args[args.iter().position(|a| a == "--config").unwrap() + 1];
    let vol = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["configMap"]["name"] == cm["metadata"]["name"])
        .expect("the ConfigMap is a volume");
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == vol["name"])
        .expect("the ConfigMap volume is mounted");
    let key = Path::new(config_arg).file_name().unwrap().to_str().unwrap();
    assert_eq!(
        Path::new(mount["mountPath"].as_str().unwrap()).join(key),
        Path::new(config_arg)
    );
    let toml = cm["data"][key]
        .as_str()
        .expect("config key in the ConfigMap");
    assert!(toml.contains(&format!(
        "data_dir = \"{}\"",
        data_mount["mountPath"].as_str().unwrap()
    )));
    let env = c["env"].as_array().unwrap();
    let secret_env = env
        .iter()
        .find(|e| e["name"] == "GEOBEAT_SECRET")
        .expect("GEOBEAT_SECRET");
    let r = &secret_env["valueFrom"]["secretKeyRef"];
    assert_eq!(r["name"], secret["metadata"]["name"]);
    assert!(secret["stringData"][r["key"].as_str().unwrap()].is_string());
}

#[test]
fn kubernetes_cluster_manifests_validate_offline_and_fit_the_server() {
    // deploy/k8s/cluster/ (a three-node cluster on NATS JetStream, applied with the single-node
    // Secret, headless Service and PDB): kubernetes-validate passes it; every settings key of its
    // ConfigMap and every GEOBEAT_* variable of its pod is one `geobeat serve` knows; each pod's
    // node id is its own (stable) name and it advertises its DNS name under the headless
    // service, with variables defined before they are used (Kubernetes expands `$(VAR)` only
    // from earlier entries); durability is replicated, on the NATS service the Helm values make.
    let dir = deploy("k8s/cluster");
    let files: Vec<PathBuf> = ["configmap.yaml", "statefulset.yaml"]
        .iter()
        .map(|f| dir.join(f))
        .chain(["secret.yaml", "service.yaml", "pdb.yaml"].map(|f| deploy("k8s").join(f)))
        .collect();
    let out = kubernetes_validate(&files);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubernetes-validate failed:\n{text}");
    assert_eq!(text.matches(" passed for resource ").count(), 5, "{text}");

    let sts = yaml_docs(&dir.join("statefulset.yaml")).remove(0);
    let cm = yaml_docs(&dir.join("configmap.yaml")).remove(0);
    let svc = yaml_docs(&deploy("k8s/service.yaml")).remove(0);
    assert_eq!(sts["spec"]["serviceName"], svc["metadata"]["name"]);
    assert!(sts["spec"]["replicas"].as_u64().unwrap() >= 3);
    let pod = &sts["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let args = strings(&c["args"]);
    let flags = serve_flags();
    assert_known_flags("cluster statefulset", &args, &flags);
    assert_eq!(
        pod["volumes"][0]["configMap"]["name"], cm["metadata"]["name"],
        "the pod mounts the cluster settings"
    );

    // Settings keys are flags with `_` for `-`.
    let toml = cm["data"]["geobeat.toml"].as_str().expect("geobeat.toml");
    let mut keys = BTreeMap::new();
    for line in toml.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').expect("key = value");
        keys.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
    }
    for k in keys.keys() {
        let flag = format!("--{}", k.replace('_', "-"));
        assert!(
            flags.contains(&flag),
            "cluster configmap: unknown setting {k}"
        );
    }
    assert_eq!(keys["durability"], "replicated");
    let helm = yaml_docs(&deploy("nats/helm-values.yaml")).remove(0);
    assert_eq!(
        keys["nats_url"],
        format!("nats://{}:4222", helm["fullnameOverride"].as_str().unwrap()),
        "geobeat connects to the service the NATS Helm values create"
    );

    // The environment: known variables, defined before use.
    let help = run(Command::new(bin()).args(["serve", "--help"]));
    let env = c["env"].as_array().unwrap();
    let mut defined = BTreeSet::new();
    for e in env {
        let name = e["name"].as_str().unwrap();
        if name.starts_with("GEOBEAT_") {
            // A setting's variable (`[env: NAME]`), or one its help names (GEOBEAT_SECRET).
            let named = help
                .split(|c: char| !(c.is_ascii_uppercase() || c == '_'))
                .any(|w| w == name);
            assert!(named, "{name} is not a variable geobeat serve reads");
        }
        if let Some(v) = e["value"].as_str() {
            for used in v.split("$(").skip(1).map(|r| r.split(')').next().unwrap()) {
                assert!(
                    defined.contains(used),
                    "{name} uses $({used}) before it is defined"
                );
            }
        }
        defined.insert(name.to_string());
    }
    let var = |n: &str| {
        env.iter()
            .find(|e| e["name"] == n)
            .unwrap_or_else(|| panic!("{n}"))
    };
    assert_eq!(
        var("GEOBEAT_NODE_ID")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name",
        "a node id is the pod's stable name"
    );
    let advertise = var("GEOBEAT_ADVERTISE")["value"].as_str().unwrap();
    let svc_name = svc["metadata"]["name"].as_str().unwrap();
    assert!(
        advertise.starts_with(&format!("$(GEOBEAT_NODE_ID).{svc_name}.")),
        "advertise the pod's DNS name under the headless service: {advertise}"
    );
    let http_port = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "http")
        .unwrap()["containerPort"]
        .as_u64()
        .unwrap();
    assert!(advertise.ends_with(&format!(":{http_port}")), "{advertise}");
}

/// Where `ours` sets a key the chart's defaults do not have (a typo the chart would silently
/// ignore), or a value of another kind than the default's. Below a default that is an empty map
/// (`merge: {}`, `topologySpreadConstraints: {}`, `resources: {}`) anything goes: the chart
/// passes those through. A null default takes any value.
fn helm_value_problems(
    path: &str,
    ours: &serde_json::Value,
    chart: &serde_json::Value,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    match (ours, chart) {
        (_, Value::Null) => {}
        // A free-form map: the chart merges it as given.
        (Value::Object(_), Value::Object(c)) if c.is_empty() => {}
        (Value::Object(o), Value::Object(c)) => {
            for (k, v) in o {
                let at = format!("{path}.{k}");
                match c.get(k) {
                    Some(d) => helm_value_problems(&at, v, d, out),
                    None => out.push(format!("{at}: the chart has no such key")),
                }
            }
        }
        (Value::Bool(_), Value::Bool(_)) | (Value::Array(_), Value::Array(_)) => {}
        // Sizes and counts may be written either way (`size: 20Gi`, `cpu: "1"`, `port: 8222`).
        (Value::String(_) | Value::Number(_), Value::String(_) | Value::Number(_)) => {}
        (o, c) => out.push(format!(
            "{path}: {o} where the chart expects a value like {c}"
        )),
    }
}

#[test]
fn nats_helm_values_use_only_keys_the_chart_reads_and_keep_jetstream_durable() {
    // deploy/nats/helm-values.yaml against the official chart's own defaults (vendored: no
    // network, no helm here): every key must exist there (the chart ignores unknown keys, so a
    // typo would silently drop a setting), and the settings geobeat's promises rest on are set:
    // JetStream on file storage, three clustered servers (R3 needs a majority), and
    // `sync_interval: always` as in the test cluster's configs. The checker is shown to fail on
    // a misspelt key first.
    let chart = yaml_docs(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nats-helm-2.14.2-values.yaml"),
    )
    .remove(0);
    let ours = yaml_docs(&deploy("nats/helm-values.yaml")).remove(0);

    let mut typo = ours.clone();
    typo["config"]["jetstream"]["fileStorage"] = serde_json::json!({"enabled": true});
    typo["config"]["cluster"]["replicas"] = serde_json::json!(true);
    let mut found = Vec::new();
    helm_value_problems("", &typo, &chart, &mut found);
    assert_eq!(
        found.len(),
        2,
        "the checker must catch both planted faults: {found:?}"
    );

    let mut problems = Vec::new();
    helm_value_problems("", &ours, &chart, &mut problems);
    assert!(
        problems.is_empty(),
        "deploy/nats/helm-values.yaml: {problems:#?}"
    );

    let js = &ours["config"]["jetstream"];
    assert_eq!(js["enabled"], true, "JetStream must be enabled");
    assert_eq!(
        js["fileStore"]["enabled"], true,
        "geobeat's streams are file-backed"
    );
    assert_eq!(
        js["fileStore"]["pvc"]["enabled"], true,
        "the store must outlive the pod"
    );
    assert_eq!(
        js["merge"]["sync_interval"], "always",
        "without sync_interval: always JetStream may lose acknowledged messages"
    );
    let cluster = &ours["config"]["cluster"];
    assert_eq!(cluster["enabled"], true);
    assert!(
        cluster["replicas"].as_u64().unwrap_or(0) >= 3,
        "R3 streams need 3 servers"
    );
    for n in ["n1", "n2", "n3"] {
        let conf = std::fs::read_to_string(deploy(&format!("nats/{n}.conf"))).unwrap();
        assert!(
            conf.lines().any(|l| l.trim() == "sync_interval: always"),
            "deploy/nats/{n}.conf must sync every write too"
        );
    }
    // geobeat creates its streams on file storage (what the values' file store holds).
    let plan =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/replicate/mod.rs"))
            .unwrap();
    assert!(
        plan.contains(r#""storage": "file""#),
        "streams must be file-backed"
    );
}

/// Starts the real server with `toml` as its settings file (listen address and data directory
/// given as flags, which win over the file) and checks it answers /healthz and, when the file
/// sets `metrics_listen`, that the port given on the command line serves /metrics.
fn start_with_config(toml: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("geobeat.toml");
    std::fs::write(&config, toml).unwrap();
    let metrics = free_addr();
    let server = Server::start(
        &dir.path().join("data"),
        &[
            "--config",
            &config.display().to_string(),
            "--metrics-listen",
            &metrics.to_string(),
        ],
    );
    assert_eq!(server.get("/healthz", None).0, 200);
    let (st, body) = http(metrics, "GET", "/metrics", None).unwrap();
    assert_eq!(st, 200);
    assert!(body.contains("geobeat_build_info"), "{body}");
}

#[test]
fn shipped_settings_files_start_the_real_server() {
    // The ConfigMap's geobeat.toml and compose/geobeat.toml are read by the real parser (every
    // key and value checked) and the server starts with them; the compose file's PostgreSQL
    // sink has no database here, which must not stop ingest.
    let docs = k8s_docs();
    let cm = &docs
        .iter()
        .find(|(_, d)| d["kind"] == "ConfigMap")
        .unwrap()
        .1;
    start_with_config(cm["data"]["geobeat.toml"].as_str().unwrap());
    start_with_config(&std::fs::read_to_string(deploy("compose/geobeat.toml")).unwrap());
}

#[test]
fn compose_file_fits_the_server_and_its_files_exist() {
    // deploy/compose.yaml: geobeat's command uses flags `serve` knows; the memlock limit covers
    // what the executors lock; io_uring is allowed by a seccomp profile file that exists; every
    // bind-mounted file exists (except the operator's own secret); Prometheus scrapes the port
    // geobeat's metrics listener uses, and its config passes `promtool check config`.
    let compose = &yaml_docs(&deploy("compose.yaml"))[0];
    let services = compose["services"].as_object().expect("services");
    for s in ["geobeat", "postgres", "prometheus", "grafana"] {
        assert!(services.contains_key(s), "service {s}");
    }
    let g = &services["geobeat"];
    let command = strings(&g["command"]);
    assert_eq!(command[0], "serve");
    assert_known_flags("compose", &command, &serve_flags());
    for which in ["soft", "hard"] {
        let memlock = g["ulimits"]["memlock"][which].as_u64().expect("memlock");
        assert!(
            memlock >= geobeat::limits::MEMLOCK_BYTES_MIN.max(8 << 20),
            "memlock {which} {memlock}"
        );
    }
    let seccomp = strings(&g["security_opt"])
        .into_iter()
        .find_map(|o| o.strip_prefix("seccomp=").map(String::from))
        .expect("a seccomp profile");
    assert!(
        deploy(&seccomp).is_file(),
        "seccomp profile {seccomp} missing"
    );
    for (name, svc) in services {
        for v in svc["volumes"].as_array().into_iter().flatten() {
            let src = v.as_str().unwrap().split(':').next().unwrap();
            if src.starts_with("./") {
                assert!(deploy(src).exists(), "{name}: {src} missing");
            }
        }
    }
    let toml = std::fs::read_to_string(deploy("compose/geobeat.toml")).unwrap();
    let port = toml
        .lines()
        .find_map(|l| l.strip_prefix("metrics_listen = \""))
        .and_then(|l| l.trim_end_matches('"').rsplit(':').next())
        .expect("metrics_listen in compose/geobeat.toml")
        .to_string();
    let prom = std::fs::read_to_string(deploy("prometheus/prometheus.yml")).unwrap();
    assert!(
        prom.contains(&format!("\"geobeat:{port}\"")),
        "Prometheus scrapes geobeat:{port}"
    );
    run(Command::new("promtool")
        .args(["check", "config"])
        .arg(deploy("prometheus/prometheus.yml")));
}

#[test]
fn systemd_unit_verifies_clean() {
    // `systemd-analyze verify` reports nothing on the unit (with ExecStart pointed at the
    // binary under test, since verify checks that it exists), its flags are ones `serve`
    // knows, it never passes --init (a missing mount must fail the start), and it raises
    // the locked-memory limit and filters system calls.
    let unit = std::fs::read_to_string(deploy("systemd/geobeat.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let args: Vec<String> = exec.split_whitespace().map(String::from).collect();
    assert_eq!(args[1], "serve");
    assert!(!args.contains(&"--init".to_string()));
    assert_known_flags("geobeat.service", &args, &serve_flags());
    for line in [
        "LimitMEMLOCK=infinity",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "RequiresMountsFor=/var/lib/geobeat",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} missing");
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("geobeat.service");
    std::fs::write(&copy, unit.replace(&args[0], bin())).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze (Debian package systemd; .ci/run installs it)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );
    // A misplaced key is reported (so silence above means something).
    std::fs::write(
        &copy,
        unit.replace(&args[0], bin())
            .replace("[Install]", "StartLimitIntervalSec=5min\n[Install]"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("StartLimitIntervalSec"), "{text}");
}

// ----- Item 1 (part): the seccomp profile. -----

/// `geobeat serve` for a fresh directory, started through tests/support/seccomp_exec.py under
/// deploy/seccomp-geobeat.json minus `drop`.
fn spawn_under_profile(
    dir: &Path,
    addr: std::net::SocketAddr,
    drop: &[&str],
) -> std::process::Child {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/seccomp_exec.py"))
        .arg(deploy("seccomp-geobeat.json"));
    if !drop.is_empty() {
        cmd.args(["--drop", &drop.join(",")]);
    }
    cmd.args(["--", bin(), "serve", "--init", "--shards", "2", "--listen"])
        .arg(addr.to_string())
        .arg("--data-dir")
        .arg(dir)
        .env("GEOBEAT_MQTT_LISTEN", "off")
        .env("RUST_LOG", "geobeat=warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 (Debian's, with python3-seccomp; .ci/run installs it)")
}

#[test]
fn seccomp_profile_allows_io_uring_and_its_absence_is_named() {
    // The real binary runs under deploy/seccomp-geobeat.json (loaded by libseccomp before exec,
    // as a container engine does): it starts, acks heartbeats on both shards (io_uring commits)
    // and serves /metrics. The same profile without the three io_uring calls (what Docker >= 25
    // and containerd 2 ship) is enforced: the server refuses to start and says why.
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let child = spawn_under_profile(&dir.path().join("data"), addr, &[]);
    let mut server = Server {
        child,
        addr,
        dir: dir.path().join("data"),
        args: Vec::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(http(addr, "GET", "/healthz", None), Ok((200, _))) {
        if let Some(st) = server.child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            server
                .child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("geobeat under the profile exited ({st}): {err}");
        }
        assert!(Instant::now() < deadline, "not healthy under the profile");
        std::thread::sleep(Duration::from_millis(20));
    }
    let tok = server.token(&["gateway", "s-"]);
    let mut ws = ws_connect(&server, &tok).unwrap();
    let t = now_ms();
    for seq in 1..=16u64 {
        let f = format!(
            r#"{{"seq":{seq},"id":"s-{seq}","lat":1,"lon":2,"ts":{}}}"#,
            t + seq as i64
        );
        ws.send(Message::text(f)).unwrap();
    }
    assert!(wait_ack(&mut ws, 16).is_empty());
    let (st, body) = server.get("/metrics", None);
    assert_eq!(st, 200);
    let accepted: f64 = body
        .lines()
        .filter(|l| l.starts_with("geobeat_heartbeats_accepted_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(accepted, 16.0);
    drop(server);

    let blocked = tempfile::tempdir().unwrap();
    let child = spawn_under_profile(
        &blocked.path().join("data"),
        free_addr(),
        &["io_uring_setup", "io_uring_enter", "io_uring_register"],
    );
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without io_uring: {err}");
    assert!(err.contains("io_uring is blocked"), "{err}");
}

// ----- Item 1: the container image. -----

/// `deploy/container/rootfs.sh BINARY OUT`.
fn assemble_rootfs(out: &Path) {
    let st = Command::new("sh")
        .arg(deploy("container/rootfs.sh"))
        .arg(bin())
        .arg(out)
        .status()
        .expect("sh");
    assert!(st.success(), "rootfs.sh failed");
}

/// Runs `args` inside `root` as the image's user (10001), the way an engine would: private mount
/// and PID namespaces with /proc, /sys and /dev bound in, then chroot. Killing the returned
/// process kills the server too: `--kill-child` kills the namespace's first process (the shell,
/// which keeps its parent-death signal; the server's is cleared when chroot switches users) and
/// the kernel then kills everything else in the namespace.
fn in_rootfs(root: &Path, args: &[&str]) -> Command {
    let r = root.display();
    let mut script = format!(
        "mount --bind /proc {r}/proc && mount --rbind /sys {r}/sys && mount --rbind /dev {r}/dev \
         && chroot --userspec=10001:10001 {r}"
    );
    for a in args {
        script.push(' ');
        script.push_str(a);
    }
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--pid",
        "--fork",
        "--kill-child",
        "sh",
        "-c",
        &script,
    ])
    .env_remove("HOME");
    cmd
}

#[test]
fn container_root_filesystem_serves_as_a_non_root_user_with_its_health_check() {
    // The image's root filesystem (deploy/container/rootfs.sh, what the Containerfile's runtime
    // stage holds) is complete: run the real binary inside it as uid 10001 (podman run is not
    // possible on this machine: crun's setrlimit is refused), take heartbeats, answer the
    // image's HEALTHCHECK command from inside, and keep the data private to the user.
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    assemble_rootfs(&root);
    for lib in [
        "usr/local/bin/geobeat",
        "etc/passwd",
        "etc/group",
        "etc/hosts",
    ] {
        assert!(root.join(lib).is_file(), "{lib} missing from the rootfs");
    }
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(passwd.contains("geobeat:x:10001:10001:"), "{passwd}");
    let data = root.join("var/lib/geobeat");
    let meta = std::fs::metadata(&data).unwrap();
    assert_eq!(
        (meta.uid(), meta.permissions().mode() & 0o777),
        (10001, 0o700)
    );
    // Nothing but the binary, its loader and the libraries ldd names.
    let ldd = run(Command::new("ldd").arg(bin()));
    let wanted = ldd
        .lines()
        .filter(|l| l.contains(" /") || l.trim_start().starts_with('/'));
    let mut libs = Vec::new();
    for dir in ["lib", "lib64", "usr/lib"] {
        if root.join(dir).is_dir() {
            libs.extend(walk(&root.join(dir)).into_iter().filter(|p| p.is_file()));
        }
    }
    assert_eq!(libs.len(), wanted.count(), "{libs:?} vs ldd:\n{ldd}");
    assert!(
        !root.join("bin/sh").exists(),
        "the runtime image has no shell"
    );

    let addr = free_addr();
    let listen = addr.to_string();
    let child = in_rootfs(
        &root,
        &[
            "/usr/local/bin/geobeat",
            "serve",
            "--init",
            "--shards",
            "1",
            "--listen",
            &listen,
            "--data-dir",
            "/var/lib/geobeat",
            // Port 1883 may be taken by another test's server: MQTT is not what this checks.
            "--mqtt-listen",
            "off",
        ],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("unshare (util-linux) and chroot (coreutils)");
    let server = Server {
        child,
        addr,
        dir: data.clone(),
        args: Vec::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(http(addr, "GET", "/readyz", None), Ok((200, _))) {
        assert!(
            Instant::now() < deadline,
            "the server in the rootfs never got ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let health = in_rootfs(
        &root,
        &[
            "/usr/local/bin/geobeat",
            "query",
            "ready",
            "--url",
            &format!("http://{addr}"),
        ],
    )
    .output()
    .unwrap();
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&health.stdout).trim(), "ready");

    let tok = server.token(&["gateway", "c-"]);
    let mut ws = ws_connect(&server, &tok).unwrap();
    let t = now_ms();
    ws.send(Message::text(format!(
        r#"{{"seq":1,"id":"c-1","lat":1,"lon":2,"ts":{t}}}"#
    )))
    .unwrap();
    assert!(wait_ack(&mut ws, 1).is_empty());
    drop(ws);
    drop(server);
    // Everything the server wrote belongs to the image's user and no one else can read it.
    for e in walk(&data) {
        let m = std::fs::symlink_metadata(&e).unwrap();
        assert_eq!(m.uid(), 10001, "{}", e.display());
        assert_eq!(m.permissions().mode() & 0o077, 0, "{}", e.display());
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn container_image_builds_with_podman_from_the_containerfile() {
    // deploy/container/build.sh builds the Containerfile with podman (the offline way: the
    // assembled rootfs replaces the build stage) and the image is what the README and the
    // compose/Kubernetes files expect: non-root user, the data volume, both ports, the
    // HEALTHCHECK on /readyz, geobeat as entrypoint, and small.
    let tag = format!("localhost/geobeat-test:{}", std::process::id());
    let out = Command::new("bash")
        .arg(deploy("container/build.sh"))
        .args(["--tag", &tag, "--binary", bin()])
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "build.sh failed (podman: apt-get install podman; .ci/run installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspect = Command::new("podman")
        .args(["image", "inspect", &tag])
        .output()
        .unwrap();
    let _ = Command::new("podman").args(["rmi", "-f", &tag]).output();
    assert!(inspect.status.success());
    let v: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let img = &v[0];
    let cfg = &img["Config"];
    assert_eq!(cfg["User"], "10001:10001");
    assert_eq!(cfg["Entrypoint"][0], "/usr/local/bin/geobeat");
    assert!(cfg["Volumes"].get("/var/lib/geobeat").is_some(), "{cfg}");
    for port in ["8080/tcp", "9464/tcp", "1883/tcp"] {
        assert!(cfg["ExposedPorts"].get(port).is_some(), "{cfg}");
    }
    let cmd: Vec<String> = strings(&cfg["Cmd"]);
    assert_known_flags("Containerfile CMD", &cmd[1..], &serve_flags());
    let health = strings(&img["Healthcheck"]["Test"]).join(" ");
    assert!(
        health.contains("/usr/local/bin/geobeat query ready"),
        "{health}"
    );
    let size = img["Size"].as_u64().unwrap();
    assert!(size < 64 << 20, "image is {size} bytes");
}
