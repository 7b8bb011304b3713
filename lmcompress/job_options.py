"""The options every whole job takes, in one object that checks itself (:class:`JobOptions`).

``lmcompress.jobs.run_job`` reads them; the CLI's verbs pass the same names (``lmcompress.cli.options.JOB_KEYS``
is the list of fields here), so the defaults are written once. Only ``lmcompress.errors`` is imported: the CLI
reads this module before it has loaded torch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from lmcompress.errors import UserError

OFFLOADS = ("auto", "none", "disk")
DEFAULT_PERCDAMP: float | str = 0.01  # GPTQ / SparseGPT dampening (lmcompress.algorithms.obs.damping_fraction)


def check_percdamp(percdamp: float | str) -> float | str:
    """``percdamp`` as the solvers take it: ``"auto"``, or a fraction of the mean Hessian diagonal in [0, 1).

    Accepts the text a command line gives (``"0.1"``, ``"auto"``); anything else is a UserError naming both forms.
    """
    if isinstance(percdamp, str) and percdamp.strip().lower() == "auto":
        return "auto"
    try:
        value = float(percdamp) if not isinstance(percdamp, bool) else None
    except (TypeError, ValueError):
        value = None
    if value is None or not 0.0 <= value < 1.0:  # also refuses nan
        raise UserError(
            f"percdamp must be a number in [0, 1) (a fraction of the mean Hessian diagonal, e.g. 0.01) or auto, "
            f"got {percdamp!r}",
            param="percdamp",
        )
    return value


def check_offload(offload: str) -> str:
    """``offload`` normalized (``auto``, ``none`` or ``disk``), or a UserError naming the choices."""
    text = str(offload).strip().lower()
    if text not in OFFLOADS:
        raise UserError(f"unknown offload {offload!r}: choose one of {', '.join(OFFLOADS)}", param="offload")
    return text


@dataclass
class JobOptions:
    """Where a job reads its calibration windows from, where and how it computes, and how it may write.

    ``calib_data`` / ``nsamples`` / ``seqlen`` / ``seed``: the calibration windows (``seqlen`` ``None``: min(2048,
    the model's context)); ``device`` / ``dtype``: where and in what the model is computed; ``overwrite``: replace
    an existing output; ``trust_remote_code`` / ``allow_pickle``: what the loader may run or unpickle;
    ``offload`` (``auto``, ``none``, ``disk``) / ``resume``: stream the weights from disk (``lmcompress.streaming``);
    ``progress``: draw progress bars.
    """

    calib_data: str = "c4"
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    overwrite: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False
    offload: str = "auto"
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.offload = check_offload(self.offload)
        if isinstance(self.nsamples, bool) or not isinstance(self.nsamples, int) or self.nsamples < 1:
            raise UserError(f"nsamples must be positive (a number of windows), got {self.nsamples}", param="nsamples")
        if self.seqlen is not None and (
            isinstance(self.seqlen, bool) or not isinstance(self.seqlen, int) or self.seqlen < 1
        ):
            raise UserError(f"seqlen must be positive (a number of tokens), got {self.seqlen}", param="seqlen")

    @classmethod
    def of(cls, options: dict) -> JobOptions:
        """The options named in ``options`` (the rest at their defaults); a TypeError names any unknown one."""
        unknown = sorted(set(options) - set(names()))
        if unknown:
            raise TypeError(f"unknown job option(s) {', '.join(unknown)}; the options are {', '.join(names())}")
        return cls(**options)


def names() -> tuple[str, ...]:
    """The option names, in declaration order."""
    return tuple(f.name for f in fields(JobOptions))
