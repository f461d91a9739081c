#!/usr/bin/env python3
"""Writes the Grafana dashboards in charts/onevision/dashboards/ from one table of panels.

The dashboards are generated (not hand-edited) so every panel follows the same conventions: a
Prometheus datasource variable, namespace/job template variables, and PromQL over the metric names
documented in docs/observability.md. Run it after changing a panel; a test compares the output.
"""
import json
import pathlib
import sys

OUT = pathlib.Path(__file__).resolve().parent.parent / "charts" / "onevision" / "dashboards"
SEL = 'namespace=~"$namespace", job_name=~"$job"'


def panel(pid, title, exprs, unit="short", x=0, y=0, w=12, h=8, kind="timeseries", legend=None):
    targets = []
    for i, e in enumerate(exprs):
        expr, fmt = (e if isinstance(e, tuple) else (e, None))
        t = {"refId": chr(ord("A") + i), "expr": expr, "datasource": {"type": "prometheus", "uid": "${datasource}"}}
        if fmt:
            t["legendFormat"] = fmt
        targets.append(t)
    return {
        "id": pid, "type": kind, "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else {},
        "targets": targets,
    }


def variables(with_job=True):
    vs = [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
        {"name": "namespace", "type": "query", "label": "Namespace", "includeAll": True, "multi": True,
         "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "query": {"query": "label_values(onevision_trainer_step, namespace)", "refId": "ns"},
         "refresh": 2, "allValue": ".*"},
    ]
    if with_job:
        vs.append({"name": "job", "type": "query", "label": "Job", "includeAll": True, "multi": False,
                   "datasource": {"type": "prometheus", "uid": "${datasource}"},
                   "query": {"query": 'label_values(onevision_trainer_step{namespace=~"$namespace"}, job_name)', "refId": "job"},
                   "refresh": 2, "allValue": ".*"})
    return {"list": vs}


def dashboard(uid, title, panels, with_job=True):
    return {
        "uid": uid, "title": title, "tags": ["onevision"], "schemaVersion": 39, "version": 1,
        "editable": True, "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
        "templating": variables(with_job), "panels": panels,
    }


def grid(specs, w=12, h=8):
    """Lay panels out two per row."""
    out = []
    for i, spec in enumerate(specs):
        title, exprs, unit = spec[:3]
        out.append(panel(i + 1, title, exprs, unit, x=(i % (24 // w)) * w, y=(i // (24 // w)) * h, w=w, h=h))
    return out


TRAINING = grid([
    ("Loss", [(f"onevision_trainer_loss{{{SEL}}}", "{{job_name}} {{kind}}")], "short"),
    ("Reward (mean and std per reward function)", [
        (f"onevision_trainer_reward_mean{{{SEL}}}", "{{reward}}"),
        (f"onevision_trainer_reward_std{{{SEL}}}", "{{reward}} std")], "short"),
    ("Accuracy", [(f"onevision_trainer_accuracy_ratio{{{SEL}}}", "{{split}}")], "percentunit"),
    ("KL to reference", [(f"onevision_trainer_kl{{{SEL}}}", "{{job_name}}")], "short"),
    ("Clip fraction / zero-advantage fraction", [
        (f"onevision_trainer_clip_fraction_ratio{{{SEL}}}", "clip"),
        (f"onevision_trainer_zero_advantage_fraction_ratio{{{SEL}}}", "zero advantage")], "percentunit"),
    ("Entropy and response length", [
        (f"onevision_trainer_entropy{{{SEL}}}", "entropy"),
        (f"onevision_trainer_response_length_tokens{{{SEL}}}", "response length")], "short"),
    ("Tokens/s (all ranks)", [(f"sum by (job_name) (onevision_trainer_tokens_per_second{{{SEL}}})", "{{job_name}}")], "short"),
    ("Samples/s (all ranks)", [(f"sum by (job_name) (onevision_trainer_samples_per_second{{{SEL}}})", "{{job_name}}")], "short"),
    ("MFU (GPU)", [(f"avg by (job_name) (onevision_trainer_mfu_ratio{{{SEL}}})", "{{job_name}}")], "percentunit"),
    ("Step time breakdown", [(f"sum by (phase) (rate(onevision_trainer_step_phase_seconds_total{{{SEL}}}[5m]))", "{{phase}}")], "s"),
    ("Learning rate and grad norm", [
        (f"onevision_trainer_learning_rate{{{SEL}}}", "lr"),
        (f"onevision_trainer_grad_norm{{{SEL}}}", "grad norm")], "short"),
    ("Progress", [(f"onevision_trainer_step{{{SEL}}} / onevision_trainer_total_steps{{{SEL}}}", "{{job_name}}")], "percentunit"),
    ("Checkpoint age", [(f"time() - onevision_trainer_last_checkpoint_timestamp_seconds{{{SEL}}}", "{{job_name}}")], "s"),
    ("Sampling rounds per step (grpo.dynamicSampling)", [(f"onevision_trainer_sampling_rounds{{{SEL}}}", "{{job_name}}")], "short"),
])

ROLLOUT = grid([
    ("Active rollout workers (trainer's view / exporting)", [
        (f"onevision_trainer_rollout_workers{{{SEL}}}", "healthy ({{job_name}})"),
        (f"count by (job_name) (onevision_rollout_weight_version{{{SEL}}})", "exporting ({{job_name}})")], "short"),
    ("Generated tokens/s", [(f"sum by (job_name) (rate(onevision_rollout_generated_tokens_total{{{SEL}}}[1m]))", "{{job_name}}")], "short"),
    ("Request latency p50 / p95", [
        (f"histogram_quantile(0.5, sum by (le) (rate(onevision_rollout_request_duration_seconds_bucket{{{SEL}}}[5m])))", "p50"),
        (f"histogram_quantile(0.95, sum by (le) (rate(onevision_rollout_request_duration_seconds_bucket{{{SEL}}}[5m])))", "p95")], "s"),
    ("Prompt groups/s", [(f"sum by (worker) (rate(onevision_rollout_requests_total{{{SEL}}}[1m]))", "{{worker}}")], "ops"),
    ("Queue depth", [(f"sum by (worker) (onevision_rollout_queue_depth{{{SEL}}})", "{{worker}}")], "short"),
    ("Batch occupancy", [(f"avg by (worker) (onevision_rollout_batch_occupancy_ratio{{{SEL}}})", "{{worker}}")], "percentunit"),
    ("Weight version lag", [(f"max by (worker) (onevision_rollout_weight_version_lag{{{SEL}}})", "{{worker}}")], "short"),
    ("Memory", [
        (f"sum by (worker, memory) (onevision_rollout_memory_bytes{{{SEL}}})", "rollout {{worker}} {{memory}}"),
        (f"sum by (worker, memory) (onevision_trainer_memory_bytes{{{SEL}}})", "trainer {{worker}} {{memory}}")], "bytes"),
])

# Counters of rare events (errors, restarts) have no series until the first one happens; `or ... * 0`
# draws 0 instead of "No data" for every kind the operator reconciles.
ZERO_BY_KIND = "sum by (kind) (onevision_operator_reconciles_total) * 0"
OPERATOR = grid([
    ("Jobs by phase", [('sum by (kind, phase) (onevision_operator_jobs)', "{{kind}} {{phase}}")], "short"),
    ("Gang restarts (1h)", [(f'sum by (kind) (increase(onevision_operator_gang_restarts_total[1h])) or {ZERO_BY_KIND}', "{{kind}}")], "short"),
    ("Reconcile errors/s", [(f'sum by (kind) (rate(onevision_operator_reconcile_errors_total[5m])) or {ZERO_BY_KIND}', "{{kind}}")], "ops"),
    ("Reconcile latency p95", [('histogram_quantile(0.95, sum by (le, kind) (rate(onevision_operator_reconcile_duration_seconds_bucket[5m])))', "{{kind}}")], "s"),
    ("Reconciles/s", [('sum by (kind) (rate(onevision_operator_reconciles_total[5m]))', "{{kind}}")], "ops"),
    ("Creation to all pods running (mean)", [('sum by (kind) (onevision_operator_time_to_all_pods_running_seconds_sum) / sum by (kind) (onevision_operator_time_to_all_pods_running_seconds_count)', "{{kind}}")], "s"),
])

DASHBOARDS = {
    "training-job.json": dashboard("onevision-training-job", "onevision / Training job", TRAINING),
    "rollout-pool.json": dashboard("onevision-rollout-pool", "onevision / Rollout pool", ROLLOUT),
    "operator.json": dashboard("onevision-operator", "onevision / Operator", OPERATOR, with_job=False),
}


def main():
    check = "--check" in sys.argv
    stale = []
    OUT.mkdir(parents=True, exist_ok=True)
    for name, d in DASHBOARDS.items():
        text = json.dumps(d, indent=2, sort_keys=True) + "\n"
        path = OUT / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
    if stale:
        sys.exit("dashboards out of date, run scripts/gen-dashboards.py: " + ", ".join(stale))


if __name__ == "__main__":
    main()
