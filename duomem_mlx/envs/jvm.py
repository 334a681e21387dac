"""What the two Java-backed environments (ScienceWorld, TextWorldExpress) share: a py4j gateway
to a JVM that can die mid-episode, be told apart from a failed step, and be restarted."""

import logging
import shutil
import subprocess

from ..errors import DuomemError
from .base import StepResult, parser_safe

logging.getLogger("py4j").setLevel(logging.CRITICAL)  # a dead JVM is reported once, as EnvCrashed


def require_java(package: str):
    if shutil.which("java") is None:
        raise DuomemError(
            f"{package} needs Java 11+ and none was found: `sudo apt-get install default-jre-headless` "
            "(Debian/Ubuntu) or `brew install openjdk` (macOS)"
        )


class JavaBacked:
    env = None  # the package's env object; `_make()` builds a fresh one

    def alive(self) -> bool:
        return self.env is not None and self.env._gateway.java_process.poll() is None

    def step(self, action: str) -> StepResult:
        try:
            observation, _, done, info = self.env.step(parser_safe(action))
        except Exception as e:
            raise self.crashed(e)
        return self.result(observation, info, done)

    def restart(self):
        self.close()
        self.env = self._make()

    def close(self):
        if self.env is None:
            return
        process = self.env._gateway.java_process
        try:
            self.env._gateway.shutdown()
        except Exception:
            pass  # the JVM may already be gone
        process.kill()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.env.close = lambda: None  # its __del__ would talk to the dead gateway
        self.env = None
