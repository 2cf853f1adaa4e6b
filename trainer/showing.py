"""Showing a run's progress in a terminal or a pod log: one-line summaries and the progress bar.

:func:`describe_progress` turns a :class:`~kubetune.api.statuses.Progress` into the line both
reporters print (the cluster reporter to the pod log, the local one to the terminal).
:class:`ProgressDisplay` is what ``kubetune train`` draws: a tqdm bar when the stream is a
terminal and tqdm is installed, else plain lines; other messages go above the bar.
"""

from __future__ import annotations

from typing import IO, Any

from kubetune.api.statuses import Progress


def describe_progress(progress: Progress, eval_step: int | None = None) -> str:
    """One line for a terminal or a pod log.

    Eval metrics are repeated on every line until the next evaluation; ``eval_step`` (the step
    they were computed at) marks them as ``eval@N`` on the lines of later steps, so old numbers
    never read as new ones.
    """
    parts = [f"step {progress.step}" + (f"/{progress.total_steps}" if progress.total_steps else "")]
    if progress.percent is not None:
        parts[0] += f" ({progress.percent:.1f}%)"
    if progress.epoch is not None:
        parts.append(f"epoch {progress.epoch:.2f}")
    if progress.loss is not None:
        parts.append(f"loss {progress.loss:.4f}")
    evaluation = []
    if progress.eval_loss is not None:
        evaluation.append(f"eval_loss {progress.eval_loss:.4f}")
    shown = [(n, v) for n, v in sorted((progress.metrics or {}).items()) if n != "eval_loss"]
    for name, value in shown[:4]:  # eval_loss is already shown above
        evaluation.append(f"{name} {value:.4g}")
    if evaluation and eval_step is not None and eval_step != progress.step:
        evaluation[0] = f"eval@{eval_step}: {evaluation[0]}"
    parts.extend(evaluation)
    if progress.learning_rate is not None:
        parts.append(f"lr {progress.learning_rate:.2e}")
    if progress.tokens_per_second is not None:
        parts.append(f"{progress.tokens_per_second:.0f} tok/s")
    if progress.eta_seconds is not None:
        parts.append(f"eta {_duration(progress.eta_seconds)}")
    return "  ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class ProgressDisplay:
    """A progress bar (tqdm) on a terminal, plain progress lines anywhere else."""

    def __init__(self, stream: IO[str], *, progress_bar: bool = True) -> None:
        self._stream = stream
        self._bar: Any = None
        self._use_bar = progress_bar and _stream_is_terminal(stream) and _tqdm() is not None

    def show(self, progress: Progress, eval_step: int | None = None) -> None:
        if not self._use_bar:
            self.say(describe_progress(progress, eval_step))
            return
        tqdm = _tqdm()
        if self._bar is None:
            self._bar = tqdm(total=progress.total_steps, initial=progress.step, unit="step",
                             file=self._stream, dynamic_ncols=True, leave=True)
        if progress.total_steps and self._bar.total != progress.total_steps:
            self._bar.total = progress.total_steps
        self._bar.n = progress.step
        postfix = {name: f"{value:.4g}" for name, value in (
            ("loss", progress.loss), ("eval_loss", progress.eval_loss), ("lr", progress.learning_rate),
            ("tok/s", progress.tokens_per_second)) if value is not None}
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.refresh()

    def say(self, line: str) -> None:
        """A line of its own (above the bar, when there is one)."""
        if self._bar is not None:
            self._bar.write(line, file=self._stream)
        else:
            print(line, file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _stream_is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _tqdm() -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm
