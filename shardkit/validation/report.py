"""What ``shardkit validate`` finds: findings with stable codes, gathered into a report.

Every code a finding can carry is listed in :data:`CODES` with its severity and meaning (a view of
:data:`shardkit.errors.CATALOGUE`); scripts match on the code, people read the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import CATALOGUE, REPORTED_CATEGORIES, Severity

ERROR: Severity = "error"
WARNING: Severity = "warning"

#: code -> (severity, meaning) of every code a finding can carry: the index, file, layout, --deep and
#: --model-config codes of :data:`shardkit.errors.CATALOGUE`. File-level codes are the reader's error codes.
CODES: dict[str, tuple[Severity, str]] = {
    code: (info.severity, info.meaning) for code, info in CATALOGUE.items() if info.category in REPORTED_CATEGORIES
}


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem: a stable ``code``, its ``severity``, the ``file`` and ``tensor`` concerned, and a sentence."""

    code: str
    severity: Severity
    file: str | None
    tensor: str | None
    message: str

    def to_dict(self) -> dict:
        return {"code": self.code, "severity": self.severity, "file": self.file, "tensor": self.tensor, "message": self.message}


@dataclass(slots=True)
class Report:
    """Everything validation found about ``target``.

    ``verdict`` is ``"sound"`` (no finding), ``"sound-with-warnings"`` or ``"broken"`` (at least one error);
    ``bytes_downloaded`` counts the bytes of repository files fetched from a Hub (0 for local targets).
    """

    target: str
    findings: list[Finding] = field(default_factory=list)
    checkpoint: str | None = None  # the index or file that was validated, relative to the target
    files_checked: int = 0
    tensors_checked: int = 0  # stored tensors (as inspect counts them)
    aliases_checked: int = 0  # names sharing a stored tensor's bytes (tied weights)
    bytes_downloaded: int = 0
    checksums_written: str | None = None
    checksums_matched: int | None = None  # tensors whose SHA-256 equals the --checksums manifest's
    from_cache: str | None = None  # a repo id answered by this local cache snapshot (offline, or Hub unreachable)
    server_ignored_range: bool = False  # the Hub server sent whole files: each was streamed once, then cut off

    def add(self, code: str, message: str, *, file: str | None = None, tensor: str | None = None) -> None:
        """Record a finding; its severity comes from :data:`CODES` (a code missing there counts as an error)."""
        severity = CODES.get(code, (ERROR, ""))[0]
        self.findings.append(Finding(code, severity, file, tensor, message))

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def ok(self) -> bool:
        """True when no error was found (warnings allowed)."""
        return not self.errors

    @property
    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    @property
    def verdict(self) -> str:
        if self.errors:
            return "broken"
        return "sound-with-warnings" if self.warnings else "sound"

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "checkpoint": self.checkpoint,
            "verdict": self.verdict,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "files_checked": self.files_checked,
            "tensors_checked": self.tensors_checked,
            "aliases_checked": self.aliases_checked,
            "bytes_downloaded": self.bytes_downloaded,
            "checksums_written": self.checksums_written,
            "checksums_matched": self.checksums_matched,
            "from_cache": self.from_cache,
            "server_ignored_range": self.server_ignored_range,
            "findings": [f.to_dict() for f in self.findings],
        }
