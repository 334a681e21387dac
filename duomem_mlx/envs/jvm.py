"""What the two Java-backed environments (ScienceWorld, TextWorldExpress) share: a py4j gateway
to a JVM that can die mid-episode, be told apart from a failed step, and be restarted."""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from duomem_mlx.envs.base import StepResult, parser_safe
from duomem_mlx.errors import DuomemError

logging.getLogger("py4j").setLevel(logging.CRITICAL)  # a dead JVM is reported once, as EnvCrashed

if sys.platform == "darwin":
    JAVA_HINT = (
        "`brew install openjdk`, then "
        "`export JAVA_HOME=$(brew --prefix openjdk)/libexec/openjdk.jdk/Contents/Home` "
        "(or put `$(brew --prefix openjdk)/bin` first on PATH)"
    )
else:
    JAVA_HINT = "`sudo apt-get install default-jre-headless` (Debian/Ubuntu), or set JAVA_HOME to a JDK 11+"


def require_java(package: str):
    problem = _java_problem()
    if problem:
        raise DuomemError(f"{package} needs Java 11+ and {problem}: {JAVA_HINT}")


def _java_problem() -> str | None:
    """None once a `java` that runs is first on PATH (py4j starts plain `java`); else what went wrong.
    A macOS /usr/bin/java without a JDK is a stub that fails, so finding it is not enough: it must run."""
    on_path = shutil.which("java")
    tried = []
    for java in (_from_java_home(), on_path, _from_macos_java_home()):
        if java is None or java in tried:
            continue
        tried.append(java)
        failure = _runs(java)
        if failure is None:
            if java != on_path:  # py4j runs the first `java` on PATH
                os.environ["PATH"] = os.pathsep.join([str(Path(java).parent), os.environ.get("PATH", "")])
            return None
    if not tried:
        return "none was found"
    return f"`{tried[-1]} -version` failed ({failure})"


def _runs(java: str) -> str | None:
    try:
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[0]


def _from_java_home() -> str | None:
    home = os.environ.get("JAVA_HOME")
    return str(Path(home) / "bin" / "java") if home else None


def _from_macos_java_home() -> str | None:
    """The JDK macOS knows of (/Library/Java/JavaVirtualMachines), if any."""
    if sys.platform != "darwin" or not Path("/usr/libexec/java_home").exists():
        return None
    done = subprocess.run(["/usr/libexec/java_home"], capture_output=True, text=True)
    return str(Path(done.stdout.strip()) / "bin" / "java") if done.returncode == 0 and done.stdout.strip() else None


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
