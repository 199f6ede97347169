"""``config.yaml``: typed, validated at start-up, every error names its key and file.

Environment variables override keys: ``MSKNODE__<SECTION>__<KEY>=value``
(double underscores separate the levels; a list index is a number, as in
``MSKNODE__PEERS__0__PORT=4243``). Values are read as YAML scalars, so
``MSKNODE__NODE__PORT=11113`` is the integer 11113. Relative paths (and a
relative SQLite path in ``database_url``) are taken relative to the directory
of the configuration file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicom_node.errors import ConfigError
from inference.vocabulary import HEAD_NAMES

ENV_PREFIX = "MSKNODE__"

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$)({_LABEL})(\.{_LABEL})*$")


def _check_ae_title(value: str) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    stripped = value.strip()
    if not stripped:
        raise ValueError("an AE title must not be empty")
    if len(stripped) > 16:
        raise ValueError(f"an AE title has at most 16 characters, {stripped!r} has {len(stripped)}")
    if "\\" in stripped or any(ord(c) < 0x20 or ord(c) > 0x7E for c in stripped):
        raise ValueError(f"{stripped!r}: an AE title has printable ASCII characters and no backslash")
    return stripped


def _check_host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not _HOSTNAME.match(value):
        raise ValueError(f"{value!r} is neither an IP address nor a host name")
    return value


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Host = Annotated[str, AfterValidator(_check_host)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class NodeTLS(_Section):
    """DICOM TLS on the listener (dicom_node.tls): when enabled, ``node.port`` speaks TLS only."""

    enabled: bool = False
    certificate: Path | None = None  # PEM: the node's certificate (chain)
    private_key: Path | None = None  # PEM, unencrypted
    ca_file: Path | None = None  # PEM: CAs whose client certificates are accepted
    require_client_certificate: bool = False  # needs ca_file


#: what one ``dicom-node serve`` process runs (docs/deployment.md): the DICOM listener (with the
#: quiet-period timers), the inference workers, the delivery queue's sender
Role = Literal["listener", "worker", "sender"]
ROLES: tuple[Role, ...] = ("listener", "worker", "sender")


class NodeSection(_Section):
    ae_title: AETitle = "MSKNODE"
    bind: Host = "0.0.0.0"
    port: Port = 11112
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 16
    tls: NodeTLS = NodeTLS()
    roles: list[Role] = list(ROLES)  # all three: one machine does everything

    @field_validator("roles")
    @classmethod
    def _roles(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"at least one of {', '.join(ROLES)}")
        return [r for r in ROLES if r in v]  # listed once each, in one order


#: what happens at a destination to the objects of a result version that a newer one supersedes:
#: ``keep`` them, or ``reject`` them with an IHE IOCM rejection note (dicom_node.rejections)
SupersededResults = Literal["keep", "reject"]


class PeerTLS(_Section):
    """DICOM TLS when sending to a peer (dicom_node.tls); the peer's certificate is always verified."""

    enabled: bool = False
    ca_file: Path | None = None  # PEM: CAs that sign the peer's certificate; None: the system's CAs
    certificate: Path | None = None  # PEM: the node's client certificate, when the peer asks for one
    private_key: Path | None = None  # PEM, unencrypted; with certificate
    verify_hostname: bool = False  # the certificate must name peers[].host


class Peer(_Section):
    ae_title: AETitle
    host: Host | None = None
    port: Port | None = None
    superseded_results: SupersededResults | None = None  # None: sending.superseded_results
    tls: PeerTLS | None = None


class StorageSection(_Section):
    path: Path = Path("./var")
    database_url: str = "sqlite:///./var/index.sqlite"
    min_free_mb: Annotated[int, Field(ge=0)] = 1024
    # other nodes write to storage.path too: the start-up clean-up leaves young files alone
    # (None: true when database_url is PostgreSQL, the database nodes share)
    shared: bool | None = None

    @field_validator("database_url")
    @classmethod
    def _url(cls, v: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(v)
        except ArgumentError as exc:
            raise ValueError(f"not a database URL: {exc}") from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {url.get_backend_name()!r} (sqlite or postgresql)")
        return v


class LimitsSection(_Section):
    """What one peer may make the node hold (dicom_node.edge)."""

    max_associate_rq_bytes: Annotated[int, Field(ge=1024, le=1 << 20)] = 65536
    max_pdu_bytes: Annotated[int, Field(ge=16384, le=1 << 28)] = 4 << 20  # advertised as Maximum Length Received
    pdu_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0  # a whole PDU, once its header arrived
    # one message's data set (or command set) as its P-DATA fragments arrive: the most one association holds
    max_dataset_mb: Annotated[int, Field(ge=1, le=65536)] = 512
    # connections accepted but not yet associated (dicom_node.connections); they never count against
    # node.max_associations
    max_pending_connections: Annotated[int, Field(ge=1, le=1000)] = 16
    max_pending_per_address: Annotated[int, Field(ge=1, le=1000)] = 4
    associate_seconds: Annotated[float, Field(gt=0, le=600)] = 10.0  # accept to a whole A-ASSOCIATE-RQ (TLS included)
    idle_seconds: Annotated[float, Field(gt=0, le=86400)] = 60.0  # an association with no PDU this long is aborted
    # Rows x Columns x frames an image may declare (dicom_node.imagesize); its codestreams must agree
    max_image_megapixels: Annotated[float, Field(gt=0, le=10000)] = 100.0

    @property
    def max_image_pixels(self) -> int:
        return int(self.max_image_megapixels * 1e6)

    @model_validator(mode="after")
    def _per_address_within_budget(self) -> LimitsSection:
        if self.max_pending_per_address > self.max_pending_connections:
            raise ValueError(f"max_pending_per_address ({self.max_pending_per_address}) is more than "
                             f"max_pending_connections ({self.max_pending_connections}): one address could take "
                             f"the whole budget")
        return self


class StudySection(_Section):
    quiet_seconds: Annotated[float, Field(gt=0, le=86400)] = 10.0


class SendingSection(_Section):
    """The persistent send queue: retries with exponential backoff, then a dead-letter state."""

    base_delay_seconds: Annotated[float, Field(gt=0)] = 5.0
    multiplier: Annotated[float, Field(ge=1)] = 2.0
    max_delay_seconds: Annotated[float, Field(gt=0)] = 300.0
    max_attempts: Annotated[int, Field(ge=1)] = 10
    timeout_seconds: Annotated[float, Field(gt=0)] = 30.0  # network / DIMSE timeout of one association
    poll_seconds: Annotated[float, Field(gt=0)] = 1.0  # how often the queue is looked at
    calling_ae_title: AETitle | None = None  # default: node.ae_title
    superseded_results: SupersededResults = "keep"  # per destination: peers[].superseded_results

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt."""
        return min(self.max_delay_seconds, self.base_delay_seconds * self.multiplier ** max(0, attempts - 1))


OUTPUT_KINDS = ("sr", "heatmaps", "summary", "gsps")


class RuleMatch(_Section):
    """Every given list must contain the image's value (case-insensitive); an absent list matches all."""

    calling_ae: list[str] | None = None
    modality: list[str] | None = None
    body_part: list[str] | None = None  # BodyPartExamined, or the anatomy head's answer when the tag is missing
    view_position: list[str] | None = None
    sop_class: list[str] | None = None  # SOP Class UIDs


class Outputs(_Section):
    """Destinations per output kind: ``origin`` (the peer that sent the study) or a peer's AE title."""

    sr: list[str] = ["origin"]
    heatmaps: list[str] = ["origin"]
    summary: list[str] = ["origin"]
    gsps: list[str] = ["origin"]  # grayscale softcopy presentation states: the boxes over the original image

    def of_kind(self, kind: str) -> list[str]:
        """The destinations of one output kind (one of :data:`OUTPUT_KINDS`)."""
        by_kind = {"sr": self.sr, "heatmaps": self.heatmaps, "summary": self.summary, "gsps": self.gsps}
        return by_kind[kind]


class RoutingRule(_Section):
    name: str
    match: RuleMatch = RuleMatch()
    skip: bool = False  # a matching image is not processed (reported with the rule's name)
    heads: list[str] | Literal["all"] = "all"
    outputs: Outputs = Outputs()

    @field_validator("heads")
    @classmethod
    def _heads(cls, v):
        if v != "all":
            for h in v:
                if h not in HEAD_NAMES:
                    raise ValueError(f"unknown head {h!r} (one of {', '.join(HEAD_NAMES)})")
        return v


class RoutingSection(_Section):
    rules: list[RoutingRule] = []  # first match wins
    default: RoutingRule = RoutingRule(name="default")


class PipelineSection(_Section):
    enabled: bool = True
    bundle: Path | None = None  # None: the bundled default model
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: Annotated[int, Field(ge=1, le=256)] = 8  # images per forward pass (dicom_node.stages.infer)
    workers: Annotated[int, Field(ge=1, le=8)] = 1
    # decoder threads per worker, decoding the next batch while the model reads one (dicom_node.decoding);
    # 0: decode in the inference thread
    decode_workers: Annotated[int, Field(ge=0, le=64)] = 2
    rerun_on_late_images: bool = True
    # a study none of whose radiographs the model could read (declined as outside its domain, or not
    # decodable) still gets an SR and a summary capture saying why, sent where the images' routing
    # rules send those; false: such a study is skipped, and nothing is sent
    report_not_processed: bool = True
    lease_seconds: Annotated[float, Field(gt=0)] = 600.0  # a claim not renewed for this long is taken back
    threads: Annotated[int, Field(ge=1, le=256)] | None = None  # CPU threads per worker; None: cores - 1
    nice: Annotated[int, Field(ge=0, le=19)] = 10  # workers yield the CPU to the listener
    # the most memory (RLIMIT_DATA) one inference worker may take; None: no cap. Not with a CUDA device
    memory_limit_mb: Annotated[int, Field(ge=1024)] | None = None
    max_attempts: Annotated[int, Field(ge=1)] = 3

    @model_validator(mode="after")
    def _cap_on_cpu_only(self) -> PipelineSection:
        if self.memory_limit_mb is not None and self.device.startswith("cuda"):
            raise ValueError("memory_limit_mb: a memory cap breaks CUDA's own mappings; leave it out with a CUDA "
                             "device")
        return self


class RetentionSection(_Section):
    max_age_days: Annotated[float, Field(gt=0)] | None = None  # None: keep everything
    interval_minutes: Annotated[float, Field(gt=0)] = 60.0


class HttpSection(_Section):
    """The operations endpoint (dicom_node.ops_http): /healthz, /readyz, /metrics and the status page."""

    enabled: bool = True
    bind: Host = "127.0.0.1"  # off the DICOM port; localhost unless the operator opens it
    port: Port = 8080
    token: str | None = None  # when set, every endpoint but /healthz needs it (Bearer, or basic-auth password)
    show_patient_data: bool = False  # patient name and ID on the status page

    @field_validator("token")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        if v is not None and len(v) < 16:
            raise ValueError("an access token has at least 16 characters")
        return v


class AuditSection(_Section):
    """The audit trail (dicom_node.audit): DICOM PS3.15 A.5 audit messages, one JSON record per line."""

    enabled: bool = True
    path: Path | None = None  # None: <storage.path>/audit/audit.jsonl
    max_bytes: Annotated[int, Field(ge=4096)] = 10 << 20  # the file rotates at this size
    backup_count: Annotated[int, Field(ge=0, le=1000)] = 10  # rotated files kept
    syslog_host: Host | None = None  # also send each record to this syslog receiver (RFC 5424 over UDP)
    syslog_port: Port = 514


class LoggingSection(_Section):
    level: str = "INFO"

    @field_validator("level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return v


class Config(_Section):
    node: NodeSection = NodeSection()
    limits: LimitsSection = LimitsSection()
    peers: list[Peer] = Field(min_length=1)
    storage: StorageSection = StorageSection()
    study: StudySection = StudySection()
    pipeline: PipelineSection = PipelineSection()
    routing: RoutingSection = RoutingSection()
    sending: SendingSection = SendingSection()
    retention: RetentionSection = RetentionSection()
    logging: LoggingSection = LoggingSection()
    http: HttpSection = HttpSection()
    audit: AuditSection = AuditSection()

    #: where the configuration was read from (not a YAML key)
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("peers")
    @classmethod
    def _unique_peers(cls, peers: list[Peer]) -> list[Peer]:
        seen: dict[str, int] = {}
        for i, peer in enumerate(peers):
            if peer.ae_title in seen:
                raise ValueError(f"ae_title {peer.ae_title!r} is listed twice (items {seen[peer.ae_title]} and {i})")
            seen[peer.ae_title] = i
        return peers

    @model_validator(mode="after")
    def _destinations(self) -> Config:
        if self.http.enabled and self.http.port == self.node.port:
            raise ValueError(f"http.port: {self.http.port} is node.port too; the operations endpoint needs "
                             f"a port of its own")
        names = {p.ae_title for p in self.peers}
        for where, rule in [("routing.default", self.routing.default)] + \
                [(f"routing.rules[{i}]", r) for i, r in enumerate(self.routing.rules)]:
            for kind in OUTPUT_KINDS:
                for dest in rule.outputs.of_kind(kind):
                    if dest != "origin" and dest not in names:
                        raise ValueError(f"{where}.outputs.{kind}: {dest!r} is neither 'origin' nor a peer's "
                                         f"ae_title")
                    peer = self.peer(dest) if dest != "origin" else None
                    if peer is not None and (peer.host is None or peer.port is None):
                        raise ValueError(f"{where}.outputs.{kind}: peer {dest!r} needs a host and a port to "
                                         f"receive results")
        return self

    def peer(self, ae_title: str) -> Peer | None:
        for p in self.peers:
            if p.ae_title == ae_title.strip():
                return p
        return None

    def node_identity(self) -> str:
        """This node among the nodes that share one database: its host name and DICOM port, the same
        across its restarts. Its workers' study claims and its sender's delivery claims carry it, so that
        a node gives back only its own claims when it (re)starts, never another node's. A node that runs
        only some roles names them: a worker-only process beside a whole node on one machine (with the
        same node.port) is another node."""
        roles = "" if list(self.node.roles) == list(ROLES) else "/" + "+".join(self.node.roles)
        return f"{socket.gethostname()}/{self.node.port}{roles}"

    def runs(self, role: str) -> bool:
        """Whether this process runs ``role`` (one of :data:`ROLES`; ``node.roles``, or ``serve --role``)."""
        return role in self.node.roles


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _apply_env(data: dict, environ: dict[str, str]) -> dict:
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        if not parts:
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            key: Any = int(part) if part.isdigit() else part
            if isinstance(node, list):
                if not isinstance(key, int) or key >= len(node):
                    raise ConfigError(f"environment variable {name}: no list item {part}", key=".".join(parts))
            elif not isinstance(node, dict):
                raise ConfigError(f"environment variable {name}: {'.'.join(parts[:i])} is not a section",
                                  key=".".join(parts))
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and key not in node:
                    node[key] = {}
                node = node[key]
    return data


def _resolve_paths(cfg: Config, base: Path) -> Config:
    storage = cfg.storage
    path = storage.path if storage.path.is_absolute() else (base / storage.path)
    url = storage.database_url
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != "sqlite://" \
            and ":memory:" not in url:
        url = prefix + str((base / url[len(prefix):]).resolve())
    storage = storage.model_copy(update={"path": path.resolve(), "database_url": url})

    def resolved(section: _Section, keys: tuple[str, ...]) -> Any:
        update = {k: (base / v).resolve() for k in keys if (v := getattr(section, k)) is not None
                  and not v.is_absolute()}
        return section.model_copy(update=update) if update else section

    tls_files = ("certificate", "private_key", "ca_file")
    node = cfg.node.model_copy(update={"tls": resolved(cfg.node.tls, tls_files)})
    peers = [p.model_copy(update={"tls": resolved(p.tls, tls_files)}) if p.tls is not None else p
             for p in cfg.peers]
    audit = resolved(cfg.audit, ("path",))
    return cfg.model_copy(update={"storage": storage, "node": node, "peers": peers, "audit": audit})


def parse_config(data: Any, *, source: str = "<config>", base: Path | None = None,
                 environ: dict[str, str] | None = None) -> Config:
    """Validate ``data`` (the parsed YAML) into a :class:`Config`; raise :class:`ConfigError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the file must hold a mapping of sections (node, peers, storage, study)", path=source)
    data = _apply_env(data, dict(os.environ) if environ is None else environ)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = _loc(err["loc"])
        msg = err["msg"]
        if not err["loc"] and msg.startswith("Value error, ") and ": " in msg:
            # a check across sections names its key at the start of the message
            key, msg = msg[len("Value error, "):].split(": ", 1)
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required value is missing"
        elif err["type"] != "value_error" and "input" in err and not isinstance(err["input"], (dict, list)):
            msg = f"{msg} (got {err['input']!r})"
        more = f" (and {len(exc.errors()) - 1} more error(s))" if len(exc.errors()) > 1 else ""
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        raise ConfigError(msg + more, key=key, path=source) from None
    cfg = _resolve_paths(cfg, base or Path.cwd())
    from dicom_node.tls import check_config  # here: dicom_node.tls reads this module's types

    check_config(cfg, source)
    return cfg.model_copy(update={"source": Path(source) if source != "<config>" else None})


def load_config(path: str | os.PathLike, environ: dict[str, str] | None = None) -> Config:
    """Read and validate a configuration file."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError("file not found", path=str(p)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"not valid YAML{where}: {getattr(exc, 'problem', exc)}", path=str(p)) from None
    return parse_config(data, source=str(p), base=p.resolve().parent, environ=environ)
