"""The ``dicom-node`` command line.

Node commands (``serve``, ``check-config``, ``status``, ``studies``) read the
configuration; ``infer`` (:mod:`dicom_node.cli_infer`) and the model commands
(``model ...``, :mod:`dicom_node.cli_model`) import torch only when they run.

Logging: ``--log-level`` (or ``$MSKNODE_LOG_LEVEL``) if given, else the
configuration's ``logging.level`` once a command has read it, else INFO. The
level chosen is the node's and its workers' alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys

from dicom_node.errors import EXPECTED_ERRORS, ConfigError, StartupError

log = logging.getLogger("dicom_node")


def _log_level_override(args) -> str | None:
    return getattr(args, "log_level", None) or os.environ.get("MSKNODE_LOG_LEVEL") or None


def _load_config(args):
    """The configuration of ``--config``, with ``--log-level`` folded into ``logging.level``; the
    process logs at that level from here on (so do the inference workers, which get this config)."""
    from dicom_node.config import LoggingSection, load_config
    from dicom_node.logs import setup_logging

    cfg = load_config(args.config)
    override = _log_level_override(args)
    if override:
        try:
            cfg = cfg.model_copy(update={"logging": LoggingSection(level=override)})
        except ValueError:
            raise ConfigError("one of DEBUG, INFO, WARNING, ERROR, CRITICAL", key="--log-level") from None
    setup_logging(cfg.logging.level)
    return cfg


def cmd_check_config(args) -> int:
    from dicom_node.node import check_bundle

    cfg = _load_config(args)
    check_bundle(cfg)
    print(f"{args.config}: OK (node {cfg.node.ae_title} on {cfg.node.bind}:{cfg.node.port}, "
          f"{len(cfg.peers)} peer(s), storage {cfg.storage.path})")
    return 0


def _with_roles(cfg, given: list[str] | None):
    """``serve --role`` (repeated, or comma-separated) in place of ``node.roles``."""
    if not given:
        return cfg
    from dicom_node.config import ROLES

    roles = [r.strip().lower() for value in given for r in value.split(",") if r.strip()]
    unknown = sorted(set(roles) - set(ROLES))
    if unknown or not roles:
        raise ConfigError(f"{', '.join(unknown) or 'nothing given'}: roles are {', '.join(ROLES)} (combinable)",
                          key="--role")
    node = cfg.node.model_copy(update={"roles": [r for r in ROLES if r in roles]})
    return cfg.model_copy(update={"node": node})


def cmd_serve(args) -> int:
    from dicom_node.node import Node, check_ports

    cfg = _with_roles(_load_config(args), args.role)
    check_ports(cfg)  # a busy port: one line and exit status 2, before the index or storage is touched
    node = Node(cfg)
    node.serve_forever()
    return 0


@contextlib.contextmanager
def _open_index(args):
    from storage.index import Index

    index = Index(_load_config(args).storage.database_url)
    try:
        yield index
    finally:
        index.close()


def node_health(cfg, timeout: float = 2.0) -> dict:
    """Whether the node of ``cfg`` runs, asked through its ``/healthz`` (http.enabled):
    {"running": bool, "url": ..., and the node's answer or "error"}."""
    import urllib.error
    import urllib.request

    if not cfg.http.enabled:
        return {"running": None, "error": "http.enabled is false: the node cannot be asked"}
    host = cfg.http.bind
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    url = f"http://{'[' + host + ']' if ':' in host else host}:{cfg.http.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as rsp:
            answer = json.loads(rsp.read().decode("utf-8"))
        return {"running": True, "url": url, **answer}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        return {"running": False, "url": url, "error": str(getattr(reason, "strerror", None) or reason)}


def cmd_status(args) -> int:
    cfg = _load_config(args)
    with _open_index(args) as index:
        status = index.status()
    health = node_health(cfg)
    if args.json:
        print(json.dumps(dict(status, node=health), sort_keys=True))
    else:
        if health["running"]:
            print(f"node:      running (pid {health.get('pid')}, up {health.get('uptime_seconds')} s, "
                  f"{health['url']})")
        elif health["running"] is None:
            print(f"node:      unknown ({health['error']})")
        else:
            print(f"node:      NOT running (no answer at {health['url']}: {health['error']})")
        print(f"instances: {status['instances']}")
        print(f"studies:   {status['studies']}")
        for state, n in sorted(status["studies_by_state"].items()):
            print(f"  {state:<14} {n}")
    return 0


def cmd_studies(args) -> int:
    with _open_index(args) as index:
        rows = index.list_studies(limit=args.limit, state=args.state)
    if args.json:
        print(json.dumps(rows, sort_keys=True))
        return 0
    print(f"{'StudyInstanceUID':<64} {'state':<10} {'n':>5} {'calling AE':<16} last received")
    for r in rows:
        print(f"{r['StudyInstanceUID']:<64} {r['state']:<10} {r['instances']:>5} "
              f"{r['calling_ae'] or '':<16} {r['last_received'] or ''}")
    return 0


def cmd_instances(args) -> int:
    with _open_index(args) as index:
        rows = index.study_instances(args.study)
    keep = ("SOPInstanceUID", "SOPClassUID", "TransferSyntaxUID", "Modality", "BodyPartExamined", "ViewPosition",
            "Laterality", "Rows", "Columns", "file_path", "file_size", "receive_count", "calling_ae", "received_at")
    rows = [{k: (r[k].isoformat() if hasattr(r[k], "isoformat") else r[k]) for k in keep} for r in rows]
    if args.json:
        print(json.dumps(rows, sort_keys=True))
    else:
        for r in rows:
            print(f"{r['SOPInstanceUID']:<64} {r['Modality']:<4} {r['file_size']:>10} {r['file_path']}")
    return 0


def cmd_jobs(args) -> int:
    from storage.deliveries import DeliveryQueue
    from storage.jobs import Jobs

    with _open_index(args) as index:
        jobs = Jobs(index)
        queue = DeliveryQueue(index)
        rows = jobs.jobs(limit=args.limit)
        summaries = queue.summaries([r["id"] for r in rows])
        for r in rows:
            r["deliveries"] = summaries.get(r.pop("id"), [])
    if args.json:
        print(json.dumps(rows, sort_keys=True, default=str))
        return 0
    for r in rows:
        print(f"{r['StudyInstanceUID']:<64} {r['state']:<13} v{r['result_version']} attempts {r['attempts']} "
              f"{r['state_reason'] or r['last_error'] or ''}".rstrip())
        for d in r["deliveries"]:
            states = " ".join(f"{k} {v}" for k, v in d["states"].items() if v)
            line = f"    to {d['destination']}: {states}, attempts {d['attempts']}"
            if d["next_attempt_at"] and (d["states"].get("pending") or d["states"].get("sending")):
                line += f", next attempt {d['next_attempt_at']}"
            if d["last_error"]:
                line += f"; last error: {d['last_error']}"
            if d["states"].get("dead"):
                line += f" (dead letter: dicom-node retry --study {r['StudyInstanceUID']})"
            print(line)
    return 0


def cmd_retry(args) -> int:
    from storage.deliveries import DeliveryQueue
    from storage.jobs import Jobs

    with _open_index(args) as index:
        n_deliveries = DeliveryQueue(index).retry_dead(args.study)
        n_studies = Jobs(index).retry_failed_inference(args.study)
    print(f"re-queued {n_deliveries} dead deliver{'y' if n_deliveries == 1 else 'ies'} and "
          f"{n_studies} stud{'y' if n_studies == 1 else 'ies'} whose inference had failed")
    return 0


def cmd_db(args) -> int:
    """``db upgrade``: bring the index's schema to the newest revision; ``db current``: print its revision."""
    from storage import migrate
    from storage.database import Database

    db = Database(_load_config(args).storage.database_url)
    try:
        if args.db_command == "upgrade":
            before, after = migrate.upgrade(db)
            if before == after:
                print(f"index schema at revision {after} (newest; nothing to do)")
            else:
                print(f"index schema upgraded from revision {before or '(none)'} to {after}")
        else:
            revision, newest = migrate.current(db), migrate.head()
            if revision is None:
                state = ("made before schema migrations: `dicom-node db upgrade` stamps it at "
                         f"{migrate.BASELINE}" if migrate.is_legacy(db) else "no schema yet")
                print(f"(none): {state}; newest revision {newest}")
            else:
                print(f"{revision}{' (newest)' if revision == newest else f'; newest revision {newest}'}")
    finally:
        db.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicom-node", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None,
                   help="configuration file (default: $MSKNODE_CONFIG, else config.yaml; infer reads its "
                        "routing and pipeline.batch_size only when it is given)")
    p.add_argument("--log-level", default=None, help="override logging.level (DEBUG, INFO, ...)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the node in the foreground")
    s.add_argument("--role", action="append", default=None, metavar="ROLE[,ROLE]",
                   help="what this process runs: listener, worker, sender (repeat the option or separate "
                        "with commas; default node.roles, all three)")
    s.set_defaults(func=cmd_serve)
    s = sub.add_parser("check-config", help="validate the configuration and exit")
    s.set_defaults(func=cmd_check_config)
    s = sub.add_parser("status", help="instances and studies per state")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("studies", help="list studies")
    s.add_argument("--json", action="store_true")
    s.add_argument("--state", default=None, help="only studies in this state")
    s.add_argument("--limit", type=int, default=1000)
    s.set_defaults(func=cmd_studies)

    s = sub.add_parser("instances", help="the instances of one study")
    s.add_argument("study", help="StudyInstanceUID")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_instances)

    s = sub.add_parser("jobs", help="studies with their pipeline state, attempts, errors and deliveries")
    s.add_argument("--json", action="store_true")
    s.add_argument("--limit", type=int, default=1000)
    s.set_defaults(func=cmd_jobs)
    s = sub.add_parser("retry", help="re-queue dead-letter deliveries and studies whose inference failed")
    s.add_argument("--study", default=None, help="only this StudyInstanceUID")
    s.set_defaults(func=cmd_retry)
    s = sub.add_parser("db", help="the index's schema: upgrade it, or show its revision")
    s.add_argument("db_command", choices=("upgrade", "current"), metavar="{upgrade,current}",
                   help="upgrade: apply the schema migrations (the node also does at start-up); "
                        "current: print the schema revision")
    s.set_defaults(func=cmd_db)

    from dicom_node import cli_infer, cli_model

    cli_infer.register(sub)
    cli_model.register(sub)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``args.config`` is the configuration file to read and
    ``args.config_given`` whether ``--config`` named it."""
    args = build_parser().parse_args(argv)
    args.config_given = args.config is not None
    if args.config is None:
        args.config = os.environ.get("MSKNODE_CONFIG", "config.yaml")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dicom_node.logs import setup_logging

    try:
        setup_logging(_log_level_override(args) or "INFO")  # until a command reads the configuration
    except ValueError:
        print("configuration error: --log-level: one of DEBUG, INFO, WARNING, ERROR, CRITICAL", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EXPECTED_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
