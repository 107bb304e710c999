"""Start the operator: watch VariantAutoscalings, size every variant jointly each interval, scale targets.

Settings come from --settings FILE, else the ConfigMap --settings-configmap in --operator-namespace
(key settings.yaml, re-read every cycle; an invalid edit keeps the last good settings), else defaults.
Metrics are served on --metrics-port at /metrics. Several replicas may run: kopf peering lets only
one act at a time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

from optimizer.problem import InputError

NAME = "run"
HELP = "start the operator (kopf): the control loop, the actuator and the /metrics exporter"


def add_arguments(parser) -> None:
    parser.add_argument("--settings", metavar="FILE", help="operator settings (YAML); default: the ConfigMap or defaults")
    parser.add_argument("--settings-configmap", metavar="NAME",
                        help="ConfigMap holding settings.yaml in the operator's namespace")
    parser.add_argument("--operator-namespace", metavar="NS",
                        help="namespace of the settings ConfigMap (default $POD_NAMESPACE or 'default')")
    parser.add_argument("--namespace", "-n", metavar="NS", action="append", default=[],
                        help="watch only this namespace (repeatable); default: all namespaces")
    parser.add_argument("--metrics-port", type=int, default=8080, metavar="P", help="port of /metrics (default 8080)")
    parser.add_argument("--metrics-host", default=None, metavar="ADDR",
                        help="address of /metrics and the readiness /healthz (default $POD_IP, else 127.0.0.1)")
    parser.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig (default: in-cluster, then $KUBECONFIG)")
    parser.add_argument("--priority", type=int, help="peering priority (default: random, so one replica wins)")
    parser.add_argument("--standalone", action="store_true", help="no peering (only for a single replica)")
    parser.add_argument("--peering", default=None, metavar="NAME", help="peering object name")
    parser.add_argument("--liveness", metavar="URL", help="kopf liveness endpoint, e.g. http://0.0.0.0:8081/healthz")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def options_from_args(args):
    from variant_autoscaler.operator import PEERING_NAME, RunOptions
    from variant_autoscaler.settings import SettingsSource

    src = SettingsSource.from_env(file=args.settings, configmap=args.settings_configmap,
                                  namespace=args.operator_namespace)
    return RunOptions(settings_file=src.file, settings_configmap=src.configmap, operator_namespace=src.namespace,
                      namespaces=tuple(args.namespace), metrics_port=args.metrics_port,
                      **({"metrics_host": args.metrics_host} if args.metrics_host else {}),
                      kubeconfig=Path(args.kubeconfig) if args.kubeconfig else None,
                      peering=args.peering or PEERING_NAME, standalone=args.standalone, priority=args.priority)


async def run_operator(options, *, stop_flag: threading.Event | asyncio.Event | None = None,
                       ready_flag: threading.Event | asyncio.Event | None = None, liveness: str | None = None) -> None:
    """Run kopf with this package's handlers until `stop_flag` is set (or the process is signalled)."""
    import kopf

    from variant_autoscaler.operator import registry

    memo = kopf.Memo(options=options, identity=options.instance)
    await kopf.operator(
        identity=options.instance,
        registry=registry,
        clusterwide=not options.namespaces, namespaces=list(options.namespaces), standalone=options.standalone or None,
        peering_name=None if options.standalone else options.peering, priority=options.priority, memo=memo,
        stop_flag=stop_flag, ready_flag=ready_flag, liveness_endpoint=liveness)


def run(args) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = options_from_args(args)
    if options.settings_file is not None:
        from variant_autoscaler.operator import initial_settings

        initial_settings(options)  # a bad file stops here with "error: file: field: reason"
    if options.kubeconfig is not None and not options.kubeconfig.exists():
        raise InputError(str(options.kubeconfig), "--kubeconfig", "file does not exist")
    asyncio.run(run_operator(options, liveness=args.liveness))
    return 0
