"""What an agent agrees to run: which commands, and for `run`, which executables.

`run` is off unless executables are allowed explicitly (`run_allow`); `*` allows any. An
allowed executable is compared by its real path, and `run` is given that path, so neither
a PATH in the command's `env` nor a symlink can swap in another program. Unless any program
may run, `env` may set only the variables in `run_env_allow`: LD_PRELOAD, PYTHONPATH, BASH_ENV
and their kind would otherwise make an allowed program run someone else's code.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable

from pydantic import BaseModel

from fleet_agent.builtins import RunArgs

ANY = "*"
RUN = "run"


def _resolve(executable: str) -> str | None:
    """The real path of an executable named as a path or found on the agent's PATH."""
    path = executable if os.sep in executable else shutil.which(executable)
    if path is None or not os.path.isfile(path) or not os.access(path, os.X_OK):
        return None
    return os.path.realpath(path)


class Policy:
    def __init__(
        self,
        *,
        enabled: Iterable[str] | None,
        run_allow: Iterable[str],
        env_allow: Iterable[str] = (),
    ) -> None:
        self.enabled = frozenset(enabled) if enabled is not None else None
        allow = list(run_allow)
        self.run_any = ANY in allow
        self.run_allow = {p for p in (_resolve(a) for a in allow if a != ANY) if p is not None}
        self.run_enabled = bool(allow) and (self.enabled is None or RUN in self.enabled)
        self.env_allow = frozenset(env_allow)

    def allows(self, name: str) -> bool:
        if name == RUN:
            return self.run_enabled
        return self.enabled is None or name in self.enabled

    def refusal(self, name: str) -> str:
        if name == RUN and not self.run_enabled:
            return "command 'run' is disabled on this agent (allow executables with run_allow)"
        return f"command {name!r} is disabled on this agent (see enabled_commands)"

    def vet(self, name: str, args: BaseModel) -> tuple[BaseModel | None, str | None]:
        """The args to execute with (for `run`, argv[0] resolved), or a reason to refuse."""
        if name != RUN or not isinstance(args, RunArgs):
            return args, None
        program = args.argv[0]
        resolved = _resolve(program)
        if self.run_any:
            return args, None
        if resolved is None or resolved not in self.run_allow:
            return None, f"executable {program!r} is not allowed on this agent (run_allow)"
        if ANY not in self.env_allow:
            refused = ", ".join(repr(n) for n in sorted(set(args.env) - self.env_allow))
            if refused:
                return None, f"{refused} may not be set in env on this agent (run_env_allow)"
        return args.model_copy(update={"argv": [resolved, *args.argv[1:]]}), None
