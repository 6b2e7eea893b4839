"""The ``jennah`` command: servers (dev, worker, gateway), client calls, and operations.

Client commands talk Connect to ``--url`` (``$JENNAH_URL``, default the local gateway) as
tenant ``--tenant`` (``$JENNAH_TENANT``, sent as ``X-Tenant-Id``; dev mode) or with
``--api-key`` (``$JENNAH_API_KEY``, sent as ``Authorization: Bearer``), through
``jennah.client.JennahClient``: ``submit`` always sends a request id (``--request-id``,
or a new one) and every call retries ``unavailable`` and ``deadline_exceeded``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence

from connectrpc.errors import ConnectError
from google.protobuf import json_format
from google.protobuf.message import Message

from commands.keys import add_keys_commands
from commands.wal import add_wal_commands
from jennah.client import JennahClient
from jennah.errors import SettingsError

DEFAULT_URL = "http://127.0.0.1:8080"
EXIT_RPC_ERROR = 1
EXIT_USAGE = 2
# JobStatus without its prefix (tests/commands/test_cli.py checks it against the proto); a word
# outside it is a usage error, not a traceback.
JOB_STATUS_CHOICES = ("pending", "scheduled", "running", "completed", "failed", "cancelled")
TASK_STATUS_CHOICES = ("pending", "running", "succeeded", "failed", "cancelled")


def _print_json(msg: Message) -> None:
    print(json_format.MessageToJson(msg, indent=2))


def _pairs(values: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"jennah: {what} {item!r} must be KEY=VALUE")
        out[key] = value
    return out


def _when(msg: Message, field: str) -> str:
    """A message's timestamp field as the tables print it ("-" when unset)."""
    if not msg.HasField(field):
        return "-"
    return str(getattr(msg, field).ToDatetime().strftime("%Y-%m-%d %H:%M:%S"))


def _client(args: argparse.Namespace) -> JennahClient:
    return JennahClient(args.url, tenant=args.tenant, api_key=args.api_key,
                        timeout=args.rpc_timeout)  # fmt: skip


def _duration(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d`` → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (90, 90s, 15m, 2h)") from None
    return round(seconds)


def _request_from_file(path: str) -> Message:
    """A SubmitJobRequest from a JSON or YAML file (field names in either spelling)."""
    import yaml  # type: ignore[import-untyped]

    from jennah.v1 import deployment_pb2 as pb

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)  # YAML 1.2 reads JSON too
        req = pb.SubmitJobRequest()
        json_format.ParseDict(data if data is not None else {}, req)
    except (OSError, yaml.YAMLError, json_format.ParseError, TypeError) as exc:
        raise SystemExit(f"jennah: {path}: {exc}") from None
    return req


def submit_request(args: argparse.Namespace) -> Message:
    """The SubmitJobRequest a ``jennah submit`` names: the file (``-f``), if any, with
    every flag given on top of it (env vars and labels are merged, key by key)."""
    from jennah.v1 import deployment_pb2 as pb

    req = _request_from_file(args.file) if args.file else pb.SubmitJobRequest()
    assert isinstance(req, pb.SubmitJobRequest)
    if args.image:
        req.image_uri = args.image
    if not req.image_uri:
        raise SystemExit("jennah: submit needs an IMAGE (or image_uri in the -f file)")
    if args.commands:
        del req.commands[:]
        req.commands.extend(args.commands)
    req.env_vars.update(_pairs(args.env, "--env"))
    req.labels.update(_pairs(args.label, "--label"))
    for flag, field in (("name", "name"), ("profile", "resource_profile"),
                        ("machine_type", "machine_type"),
                        ("service_account", "service_account"), ("request_id", "request_id"),
                        ("max_retries", "max_retries"), ("boot_disk_gb", "boot_disk_size_gb")):
        value = getattr(args, flag)
        if value not in (None, ""):
            setattr(req, field, value)
    if args.spot:
        req.use_spot_vms = True
    for flag, field in (("tasks", "task_count"), ("parallelism", "parallelism")):
        value = getattr(args, flag)
        if value is not None:
            setattr(req, field, value)
    for flag, field in (("cpu_millis", "cpu_millis"), ("memory_mib", "memory_mib"),
                        ("timeout", "max_run_duration_seconds")):
        value = getattr(args, flag)
        if value is not None:
            setattr(req.resource_override, field, value)
    if args.gpu_type:
        req.accelerator.type = args.gpu_type
    if args.gpus is not None:
        req.accelerator.count = args.gpus
    return req


# What ``jennah submit --wait`` exits with when the job did not complete.
EXIT_JOB_FAILED = 1  # FAILED with no exit code that fits in 1..255
EXIT_JOB_CANCELLED = 130


def cmd_submit(args: argparse.Namespace) -> int:
    from jennah.v1 import deployment_pb2 as pb

    client = _client(args)
    resp = client.submit_job(submit_request(args))  # type: ignore[arg-type]
    if not args.wait:
        _print_json(resp)
        return 0
    print(f"job {resp.job_id}", file=sys.stderr, flush=True)
    _print_events(client.watch_job_events(pb.WatchJobEventsRequest(job_id=resp.job_id)))
    job = client.get_job(resp.job_id)
    return wait_exit_code(job)


def wait_exit_code(job: Message) -> int:
    """0 for COMPLETED; the job's own exit code for FAILED where it fits in 1..255,
    else 1; 130 for CANCELLED."""
    from jennah.v1 import deployment_pb2 as pb

    assert isinstance(job, pb.Job)
    if job.status == pb.JOB_STATUS_COMPLETED:
        return 0
    if job.status == pb.JOB_STATUS_CANCELLED:
        return EXIT_JOB_CANCELLED
    if job.HasField("exit_code") and 1 <= job.exit_code <= 255:
        return job.exit_code
    return EXIT_JOB_FAILED


def cmd_get(args: argparse.Namespace) -> int:
    _print_json(_client(args).get_job(args.job_id))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from jennah.v1 import deployment_pb2 as pb

    client = _client(args)
    status = f"JOB_STATUS_{args.status.upper()}" if args.status else "JOB_STATUS_UNSPECIFIED"
    req = pb.ListJobsRequest(
        page_size=args.page_size, page_token=args.page_token, status=status,
        labels=_pairs(args.label, "--label"), name_prefix=args.name_prefix,
    )
    resp = client.list_jobs(req)
    if args.output == "json":
        _print_json(resp)
        return 0
    print(f"{'JOB ID':<38} {'STATUS':<10} {'EXIT':>4}  {'CREATED':<20} NAME")
    for job in resp.jobs:
        status_name = pb.JobStatus.Name(job.status).removeprefix("JOB_STATUS_")
        exit_code = str(job.exit_code) if job.HasField("exit_code") else "-"
        print(f"{job.job_id:<38} {status_name:<10} {exit_code:>4}  {_when(job, 'created_at'):<20} "
              f"{job.name}")
    if resp.next_page_token:
        print(f"next page: --page-token {resp.next_page_token}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    _print_json(_client(args).cancel_job(args.job_id))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    _print_json(_client(args).delete_job(args.job_id))
    return 0


def cmd_tenant(args: argparse.Namespace) -> int:
    _print_json(_client(args).get_current_tenant())
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from jennah.v1 import deployment_pb2 as pb

    status = f"TASK_STATUS_{args.status.upper()}" if args.status else "TASK_STATUS_UNSPECIFIED"
    req = pb.ListTasksRequest(job_id=args.job_id, page_size=args.page_size,
                              page_token=args.page_token, status=status)  # fmt: skip
    resp = _client(args).list_tasks(req)
    if args.output == "json":
        _print_json(resp)
        return 0
    print(f"{'TASK':>5} {'STATUS':<10} {'EXIT':>4} {'ATTEMPT':>7}  {'STARTED':<19}  ERROR")
    for t in resp.tasks:
        name = pb.TaskStatus.Name(t.status).removeprefix("TASK_STATUS_")
        code = str(t.exit_code) if t.HasField("exit_code") else "-"
        started = _when(t, "started_at")
        print(f"{t.index:>5} {name:<10} {code:>4} {t.attempt:>7}  {started:<19}  "
              f"{t.error_message}")
    if resp.next_page_token:
        print(f"next page: --page-token {resp.next_page_token}")
    return 0


def cmd_notifications(args: argparse.Namespace) -> int:
    from jennah.v1 import deployment_pb2 as pb

    client = _client(args)
    for notification_id in args.ack:
        client.ack_notification(notification_id)
    resp = client.list_notifications(args.limit, args.unread)
    print(f"{resp.unread_count} unread")
    for n in resp.notifications:
        status = pb.JobStatus.Name(n.final_status).removeprefix("JOB_STATUS_")
        at = _when(n, "occurred_at")
        mark = " " if n.is_read else "*"
        print(f"{mark} {n.id}  {at}  {status:<9} {n.job_id}  {n.job_name}  {n.error_message}")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from jennah.v1 import deployment_pb2 as pb

    client = _client(args)
    if args.follow:
        req = pb.WatchJobEventsRequest(job_id=args.job_id, after_seq=args.after_seq)
        stream = client.watch_job_events(req)
    else:
        stream = iter(client.list_job_events(args.job_id, args.after_seq))
    _print_events(stream)
    return 0


def _print_events(stream: Iterable[Message]) -> None:
    from jennah.v1 import deployment_pb2 as pb

    for ev in stream:
        assert isinstance(ev, pb.JobEvent)
        kind = pb.EventKind.Name(ev.kind).removeprefix("EVENT_KIND_")
        if ev.HasField("task_index"):  # a job of several tasks: which task said it
            kind = f"{kind}[{ev.task_index}]"
        at = ev.created_at.ToDatetime().strftime("%H:%M:%S.%f")[:-3]
        text = ev.output.rstrip("\n") if ev.output else ev.message
        print(f"{ev.seq:>6} {at} {kind:<14} {text}", flush=True)


def cmd_worker(args: argparse.Namespace) -> int:
    from commands.worker import main

    return main()


def cmd_gateway(args: argparse.Namespace) -> int:
    from commands.gateway import main

    return main()


def cmd_dev(args: argparse.Namespace) -> int:
    from commands.dev import run_dev

    return run_dev(workers=args.workers, port=args.port)


def cmd_db_migrate(args: argparse.Namespace) -> int:
    from database import STORES, create_store
    from jennah.settings import load_store_settings

    store = create_store(load_store_settings(stores=STORES))
    try:
        applied = store.migrate()
    finally:
        store.close()
    print(f"{store.name}: applied {len(applied)} migration(s)")
    for name in applied:
        print(f"  {name}")
    return 0


def _add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("JENNAH_URL", DEFAULT_URL))
    p.add_argument("--tenant", default=os.environ.get("JENNAH_TENANT", ""))
    p.add_argument("--api-key", default=os.environ.get("JENNAH_API_KEY", ""))
    p.add_argument("--rpc-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="each call's deadline")


def build_parser() -> argparse.ArgumentParser:
    return _build_parsers()[0]


def _build_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``jennah`` parser and its ``submit`` subparser."""
    parser = argparse.ArgumentParser(prog="jennah", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str,
            client: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.set_defaults(fn=fn)
        if client:
            _add_client_options(p)
        return p

    p = submit = add("submit", cmd_submit,
            "submit a job: jennah submit [OPTIONS] IMAGE [OPTIONS] -- CMD ARGS...")
    p.add_argument("image", nargs="?", default="",
                   help="the container image (or image_uri in the -f file)")
    p.add_argument("commands", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--file", "-f", default="", metavar="JOB.json|yaml",
                   help="a SubmitJobRequest in JSON or YAML; flags override it")
    p.add_argument("--env", "-e", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--label", "-l", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--name", default="")
    p.add_argument("--profile", default="", help="small | medium | large | xlarge")
    p.add_argument("--cpu-millis", type=int, default=None, help="1000 = one vCPU")
    p.add_argument("--memory-mib", type=int, default=None)
    p.add_argument("--timeout", type=_duration, default=None, metavar="DURATION",
                   help="the job's longest run: 90, 90s, 15m, 2h")
    p.add_argument("--machine-type", default="")
    p.add_argument("--boot-disk-gb", type=int, default=None)
    p.add_argument("--service-account", default="")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per task")
    p.add_argument("--gpu-type", default="", help="the provider's accelerator type "
                   "(GCP: nvidia-tesla-t4, ...)")
    p.add_argument("--max-retries", type=int, default=None)
    p.add_argument("--request-id", default="",
                   help="idempotency key (default: a new one, reused by every retry)")
    p.add_argument("--spot", action="store_true", help="use spot VMs")
    p.add_argument("--tasks", type=int, default=None, metavar="N",
                   help="run N tasks (each sees JENNAH_TASK_INDEX and JENNAH_TASK_COUNT)")
    p.add_argument("--parallelism", type=int, default=None, metavar="P",
                   help="at most P tasks at a time (default: no limit)")
    p.add_argument("--wait", "-w", action="store_true",
                   help="follow the job live; exit 0 if it COMPLETED, its exit code if it "
                   "FAILED (1 if none fits), 130 if CANCELLED")
    for name, fn, help_ in (("get", cmd_get, "show a job"), ("cancel", cmd_cancel, "cancel a job"),
                            ("delete", cmd_delete, "delete a job")):
        add(name, fn, help_).add_argument("job_id")
    p = add("list", cmd_list, "list jobs, newest first")
    p.add_argument("--status", default="", type=str.lower, choices=JOB_STATUS_CHOICES,
                   help="only jobs in this state")
    p.add_argument("--label", "-l", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--name-prefix", default="")
    p.add_argument("--page-size", type=int, default=0)
    p.add_argument("--page-token", default="")
    p.add_argument("--output", "-o", choices=("table", "json"), default="table")
    p = add("events", cmd_events, "print a job's events (--follow: live until it ends)")
    p.add_argument("job_id")
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--after-seq", type=int, default=0)
    add("tenant", cmd_tenant, "show the tenant you are calling as")
    p = add("tasks", cmd_tasks, "list a job's tasks")
    p.add_argument("job_id")
    p.add_argument("--status", default="", type=str.lower, choices=TASK_STATUS_CHOICES,
                   help="only tasks in this state")
    p.add_argument("--page-size", type=int, default=0)
    p.add_argument("--page-token", default="")
    p.add_argument("--output", "-o", choices=("table", "json"), default="table")
    p = add("notifications", cmd_notifications, "list your notifications (newest first)")
    p.add_argument("--unread", action="store_true", help="only the unread ones")
    p.add_argument("--limit", type=int, default=0, help="at most this many (default 20)")
    p.add_argument("--ack", metavar="ID", action="append", default=[],
                   help="mark this notification read (repeatable)")

    add("worker", cmd_worker, "run a worker (settings from the environment)", client=False)
    add("gateway", cmd_gateway, "run the gateway (settings from the environment)", client=False)
    p = add("dev", cmd_dev, "run a gateway and workers on SQLite + local provider", client=False)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--port", type=int, default=int(os.environ.get("GATEWAY_PORT", "8080")))
    db = sub.add_parser("db", help="job store administration").add_subparsers(
        dest="db_command", required=True)
    db.add_parser("migrate", help="apply schema migrations").set_defaults(fn=cmd_db_migrate)
    add_keys_commands(sub)
    add_wal_commands(sub)
    return parser, submit


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line. ``submit`` takes its options before or after the image, as
    the README writes them, and everything after the first ``--`` is the job's command,
    options and all (argparse alone would swallow every option after the image)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, submit = _build_parsers()
    if argv[:1] != ["submit"]:
        return parser.parse_args(argv)
    command: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1:]
    args = submit.parse_intermixed_args(argv[1:])
    args.commands = [*args.commands, *command]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        code: int = args.fn(args)
    except SettingsError as exc:
        print(f"jennah: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConnectError as exc:
        print(f"jennah: {exc.code.value}: {exc.message}", file=sys.stderr)
        return EXIT_RPC_ERROR
    except KeyboardInterrupt:
        return 130
    return code
