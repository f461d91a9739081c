//! The node agent runs pods on the local API server: env, volumes, exit codes, deletion,
//! pod-to-pod networking over a headless Service, scheduling by resources.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use onevision_tests::{exit_code, pod_phase, wait_for, wait_for_pod, NodeAgentConfig};

const T: Duration = Duration::from_secs(60);

fn pod_ip(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn pod_runs_with_env_configmap_and_pvc() -> Result<(), Box<dyn std::error::Error>> {
    let cluster = onevision_tests::require_cluster!();
    let ns = cluster.fresh_namespace("harness-env").await?;
    let agent = cluster
        .start_node_agent(NodeAgentConfig::for_namespace(&ns))
        .await?;
    cluster.apply_yaml(
        &ns,
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: cfg}
data: {greeting.txt: "hello from configmap", mode: fast}
---
apiVersion: v1
kind: Pod
metadata: {name: env-cm, labels: {app: env-cm}}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: ignored
    command: ["sh", "-c"]
    args:
    - 'echo "$MY_ENV $(POD_NS) $MODE" > /data/out && cat /config/greeting.txt >> /data/out && echo "name=$POD_NAME ip=$POD_IP app=$APP" && hostname'
    env:
    - {name: MY_ENV, value: hello-env}
    - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
    - {name: POD_NS, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
    - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
    - {name: APP, valueFrom: {fieldRef: {fieldPath: "metadata.labels['app']"}}}
    - {name: MODE, valueFrom: {configMapKeyRef: {name: cfg, key: mode}}}
    volumeMounts:
    - {name: cfg, mountPath: /config}
    - {name: data, mountPath: /data}
  volumes:
  - {name: cfg, configMap: {name: cfg}}
  - {name: data, persistentVolumeClaim: {claimName: work}}
"#,
    )?;
    let client = cluster.client().await?;
    let pod = wait_for_pod(&client, &ns, "env-cm", T, |p| {
        matches!(pod_phase(p), "Succeeded" | "Failed")
    })
    .await?;
    let log = agent.pod_log(&ns, "env-cm", "main")?;
    assert_eq!(pod_phase(&pod), "Succeeded", "log:\n{log}");
    assert_eq!(exit_code(&pod, "main"), Some(0));
    let out = std::fs::read_to_string(agent.pvc_dir(&ns, "work").join("out"))?;
    assert_eq!(out, format!("hello-env {ns} fast\nhello from configmap"));
    let ip = pod_ip(&pod);
    assert!(!ip.is_empty(), "podIP reported");
    assert!(
        log.contains(&format!("name=env-cm ip={ip} app=env-cm")),
        "log:\n{log}"
    );
    assert!(
        log.lines().any(|l| l == "env-cm"),
        "pod hostname set, log:\n{log}"
    );
    let start = pod.status.as_ref().and_then(|s| s.start_time.clone());
    assert!(start.is_some(), "startTime reported");
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn failing_pod_reports_exit_code() -> Result<(), Box<dyn std::error::Error>> {
    let cluster = onevision_tests::require_cluster!();
    let ns = cluster.fresh_namespace("harness-fail").await?;
    let agent = cluster
        .start_node_agent(NodeAgentConfig::for_namespace(&ns))
        .await?;
    cluster.apply_yaml(
        &ns,
        r#"
apiVersion: v1
kind: Pod
metadata: {name: exit3}
spec:
  restartPolicy: Never
  containers:
  - {name: main, image: ignored, command: ["sh", "-c", "echo failing >&2; exit 3"]}
"#,
    )?;
    let client = cluster.client().await?;
    let pod = wait_for_pod(&client, &ns, "exit3", T, |p| {
        matches!(pod_phase(p), "Succeeded" | "Failed")
    })
    .await?;
    assert_eq!(pod_phase(&pod), "Failed");
    assert_eq!(exit_code(&pod, "main"), Some(3));
    assert_eq!(agent.pod_log(&ns, "exit3", "main")?, "failing\n");
    agent.stop().await?;
    Ok(())
}

fn alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn deleting_a_pod_terminates_its_process() -> Result<(), Box<dyn std::error::Error>> {
    let cluster = onevision_tests::require_cluster!();
    let ns = cluster.fresh_namespace("harness-del").await?;
    let agent = cluster
        .start_node_agent(NodeAgentConfig::for_namespace(&ns))
        .await?;
    // `polite` exits on SIGTERM; `stubborn` ignores it and must be SIGKILLed after its 2 s grace.
    // `$$$$` is the shell's `$$`: Kubernetes expands `$$` in commands to a literal `$`.
    cluster.apply_yaml(
        &ns,
        r#"
apiVersion: v1
kind: Pod
metadata: {name: polite}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: ignored
    command: ["sh", "-c", "echo $$$$ > /data/polite.pid; trap 'echo got-term > /data/polite.term; exit 0' TERM; while true; do sleep 0.1; done"]
    volumeMounts: [{name: data, mountPath: /data}]
  volumes: [{name: data, persistentVolumeClaim: {claimName: work}}]
---
apiVersion: v1
kind: Pod
metadata: {name: stubborn}
spec:
  restartPolicy: Always
  terminationGracePeriodSeconds: 2
  containers:
  - name: main
    image: ignored
    command: ["sh", "-c", "echo $$$$ > /data/stubborn.pid; trap '' TERM; while true; do sleep 0.1; done"]
    volumeMounts: [{name: data, mountPath: /data}]
  volumes: [{name: data, persistentVolumeClaim: {claimName: work}}]
"#,
    )?;
    let client = cluster.client().await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let dir = agent.pvc_dir(&ns, "work");
    let mut pids = Vec::new();
    for name in ["polite", "stubborn"] {
        wait_for_pod(&client, &ns, name, T, |p| pod_phase(p) == "Running").await?;
        let file = dir.join(format!("{name}.pid"));
        let pid: i32 = wait_for(&format!("{name} writes its pid"), T, || {
            let file = file.clone();
            async move {
                Ok::<_, String>(
                    std::fs::read_to_string(&file)
                        .ok()
                        .and_then(|s| s.trim().parse().ok()),
                )
            }
        })
        .await?;
        assert!(alive(pid), "{name} process {pid} is running");
        pids.push(pid);
    }
    let t0 = std::time::Instant::now();
    for name in ["polite", "stubborn"] {
        pods.delete(name, &DeleteParams::default()).await?;
    }
    for name in ["polite", "stubborn"] {
        wait_for(&format!("pod {name} deleted"), T, || {
            let pods = pods.clone();
            async move { pods.get_opt(name).await.map(|p| p.is_none().then_some(())) }
        })
        .await?;
    }
    let took = t0.elapsed();
    for pid in &pids {
        assert!(!alive(*pid), "process {pid} killed");
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("polite.term"))?,
        "got-term\n",
        "SIGTERM delivered first"
    );
    assert!(
        took >= Duration::from_secs(2),
        "stubborn pod got its grace period ({took:?})"
    );
    assert!(
        took < Duration::from_secs(20),
        "deletion finalised promptly ({took:?})"
    );
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn pods_reach_each_other_over_headless_service_names(
) -> Result<(), Box<dyn std::error::Error>> {
    let cluster = onevision_tests::require_cluster!();
    let ns = cluster.fresh_namespace("harness-net").await?;
    let agent = cluster
        .start_node_agent(NodeAgentConfig::for_namespace(&ns).with_gpu_nodes(2, 0))
        .await?;
    // Both listen on the same port: with their own network namespaces they do not collide.
    cluster.apply_yaml(
        &ns,
        r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: None, publishNotReadyAddresses: true, selector: {app: web}, ports: [{port: 8080}]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: site}
data: {index.html: "served by the server pod"}
---
apiVersion: v1
kind: Pod
metadata: {name: server, labels: {app: web}}
spec:
  hostname: server
  subdomain: web
  containers:
  - name: http
    image: ignored
    command: ["/usr/bin/python3", "-m", "http.server", "8080", "--directory", "/srv"]
    volumeMounts: [{name: site, mountPath: /srv}]
  volumes: [{name: site, configMap: {name: site}}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: web}}
spec:
  hostname: client
  subdomain: web
  restartPolicy: Never
  containers:
  - name: main
    image: ignored
    command:
    - /usr/bin/python3
    - -c
    - |
      import http.server, socketserver, threading, time, urllib.request
      # Hold port 8080 too, proving each pod has its own network namespace.
      srv = socketserver.TCPServer(("0.0.0.0", 8080), http.server.SimpleHTTPRequestHandler)
      threading.Thread(target=srv.serve_forever, daemon=True).start()
      for attempt in range(100):
          try:
              body = urllib.request.urlopen("http://server.web:8080/index.html", timeout=2).read().decode()
              print("got:", body, flush=True)
              break
          except Exception as e:
              print("retry:", e, flush=True)
              time.sleep(0.3)
      else:
          raise SystemExit(1)
"#,
    )?;
    let client = cluster.client().await?;
    let done = wait_for_pod(&client, &ns, "client", T, |p| {
        matches!(pod_phase(p), "Succeeded" | "Failed")
    })
    .await?;
    let log = agent.pod_log(&ns, "client", "main")?;
    assert_eq!(pod_phase(&done), "Succeeded", "client log:\n{log}");
    assert!(
        log.contains("got: served by the server pod"),
        "client log:\n{log}"
    );
    let server = wait_for_pod(&client, &ns, "server", T, |p| pod_phase(p) == "Running").await?;
    assert_ne!(
        pod_ip(&server),
        pod_ip(&done),
        "each pod has its own address"
    );
    let server_log = agent.pod_log(&ns, "server", "http")?;
    assert!(
        server_log.contains("GET /index.html"),
        "server saw the request:\n{server_log}"
    );
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn scheduler_respects_gpus_and_scheduler_name() -> Result<(), Box<dyn std::error::Error>> {
    let cluster = onevision_tests::require_cluster!();
    let ns = cluster.fresh_namespace("harness-sched").await?;
    let agent = cluster
        .start_node_agent(NodeAgentConfig::for_namespace(&ns).with_gpu_nodes(2, 8))
        .await?;
    let gpu_pod = |name: &str, sched: &str| {
        format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  schedulerName: {sched}
  containers:
  - name: main
    image: ignored
    command: ["sleep", "300"]
    resources: {{limits: {{nvidia.com/gpu: 8}}}}
"#
        )
    };
    for (name, sched) in [
        ("gpu-a", "default-scheduler"),
        ("gpu-b", "default-scheduler"),
        ("gpu-c", "default-scheduler"),
        ("other", "volcano"),
    ] {
        cluster.apply_yaml(&ns, &gpu_pod(name, sched))?;
    }
    let client = cluster.client().await?;
    let mut nodes = Vec::new();
    for name in ["gpu-a", "gpu-b"] {
        let p = wait_for_pod(&client, &ns, name, T, |p| pod_phase(p) == "Running").await?;
        nodes.push(p.spec.and_then(|s| s.node_name).unwrap_or_default());
    }
    assert_ne!(nodes[0], nodes[1], "one 8-GPU pod per 8-GPU node");
    let unschedulable = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    c.type_ == "PodScheduled"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("Unschedulable")
                })
            })
    };
    let c = wait_for_pod(&client, &ns, "gpu-c", T, unschedulable).await?;
    assert!(
        c.spec.and_then(|s| s.node_name).is_none(),
        "third 8-GPU pod stays unbound"
    );
    let other = Api::<Pod>::namespaced(client.clone(), &ns)
        .get("other")
        .await?;
    assert!(
        other.spec.and_then(|s| s.node_name).is_none(),
        "pods of another scheduler are left alone"
    );
    // Freeing a node lets the pending pod in.
    Api::<Pod>::namespaced(client.clone(), &ns)
        .delete("gpu-a", &DeleteParams::default())
        .await?;
    wait_for_pod(&client, &ns, "gpu-c", T, |p| pod_phase(p) == "Running").await?;
    agent.stop().await?;
    Ok(())
}
