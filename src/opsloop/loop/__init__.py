"""The closed loop: drift or an accuracy drop -> new data from production -> retrain -> gate ->
promote -> the servers swap.

`opsloop loop serve` runs the controller; `opsloop loop run --once [--dry-run] [--reason TEXT]`
takes one decision; `opsloop loop history` prints what happened. The modules:

- `settings`: `OPSLOOP_LOOP_*`
- `triggers`: the evidence (from the monitor or the log) and what it fires
- `controller`: the policy (limits) and the record of each decision
- `runner`: where the work runs (this machine, a Kubernetes Job, a CI dispatch)
- `retrain`: the work, `opsloop loop retrain --run N`: data version, pipeline, gate, publish
- `history`: the loop database (runs, the one-run-at-a-time lock)
- `app`: the HTTP service (Alertmanager webhook, /history, /metrics)
"""
