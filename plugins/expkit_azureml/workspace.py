"""Which Azure ML workspace a job uses and with which credentials, and connecting to it.

Finding the workspace and the credentials is offline (files and environment variables), so a
missing `config.json` or `az login` is one clear line before anything is started; `connect`
is the first call that reaches Azure.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expkit.plugin import UserError
from expkit_azureml.options import WORKSPACE_KEYS, AzureOptions

# Where Workspace.from_config() looks, in each folder from the start up to the root.
CONFIG_NAMES = ("config.json", ".azureml/config.json", "aml_config/config.json")
SERVICE_PRINCIPAL_VARS = ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET")
MSI_VARS = ("MSI_ENDPOINT", "IDENTITY_ENDPOINT")
# What `az login` leaves behind (InteractiveLoginAuthentication reuses it without a prompt).
LOGIN_CACHES = ("msal_token_cache.json", "msal_token_cache.bin", "accessTokens.json")
NO_CONFIG_HINT = (
    "download it from the Azure portal (your Azure ML workspace > Download config.json) into "
    "this folder, or set compute.options.workspace to its path or to "
    "{subscription_id, resource_group, workspace_name}"
)


@dataclass(frozen=True)
class WorkspaceRef:
    """An Azure ML workspace by name, and where that name came from."""

    subscription_id: str
    resource_group: str
    workspace_name: str
    source: str  # "config.json at /path" or "compute.options.workspace"

    def to_dict(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in WORKSPACE_KEYS}


def find_config(starts: list[Path]) -> Path | None:
    """The first Azure ML config.json in each start folder or its parents, as from_config()."""
    for start in starts:
        for folder in [start, *start.parents]:
            for name in CONFIG_NAMES:
                candidate = folder / name
                if candidate.is_file():
                    return candidate
    return None


def workspace_ref(options: AzureOptions, source_directory: str | None = None) -> WorkspaceRef:
    """The workspace the job names, from compute.options.workspace or a config.json found
    from the current folder (then the job's source folder) up; UserError if there is none."""
    if isinstance(options.workspace, dict):
        return WorkspaceRef(**options.workspace, source="compute.options.workspace")
    if isinstance(options.workspace, str):
        path = Path(options.workspace).expanduser()
        if path.is_dir():
            path = find_config([path]) or path / "config.json"
        if not path.is_file():
            raise UserError(
                f"compute.options.workspace: {path} does not exist; give the path of your "
                "workspace's config.json (Azure portal > your workspace > Download config.json)"
            )
        return _read_config(path)
    starts = [Path.cwd()] + ([Path(source_directory)] if source_directory else [])
    found = find_config(starts)
    if found is None:
        where = " or ".join(str(s) for s in dict.fromkeys(starts))
        raise UserError(f"no Azure ML config.json in {where} or a parent folder; {NO_CONFIG_HINT}")
    return _read_config(found)


def _read_config(path: Path) -> WorkspaceRef:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: not a readable Azure ML config.json ({error})") from None
    if not isinstance(data, dict):
        data = {}
    # Older files spell the workspace's name `workspace`; from_config() accepts both.
    data.setdefault("workspace_name", data.get("workspace"))
    missing = [k for k in WORKSPACE_KEYS if not isinstance(data.get(k), str) or not data[k]]
    if missing:
        raise UserError(f"{path}: not an Azure ML config.json (no {missing[0]}); {NO_CONFIG_HINT}")
    return WorkspaceRef(
        data["subscription_id"],
        data["resource_group"],
        data["workspace_name"],
        source=f"config.json at {path}",
    )


def credentials(options: AzureOptions) -> str:
    """Which authentication to use (`options.auth`, or the first one available): checked
    offline, so that a machine without credentials gets one line instead of a login prompt
    that nobody answers."""
    kind = options.auth
    if kind == "auto":
        if all(os.environ.get(v) for v in SERVICE_PRINCIPAL_VARS):
            kind = "service_principal"
        elif any(os.environ.get(v) for v in MSI_VARS):
            kind = "msi"
        elif _logged_in() or _interactive_terminal():
            kind = "interactive"
        else:
            raise UserError(
                "no Azure credentials: run `az login` on this machine, or set AZURE_TENANT_ID, "
                "AZURE_CLIENT_ID and AZURE_CLIENT_SECRET for a service principal "
                "(compute.options.auth chooses one: interactive, service_principal, msi)"
            )
    if kind == "service_principal":
        missing = [v for v in SERVICE_PRINCIPAL_VARS if not os.environ.get(v)]
        if missing:
            raise UserError(
                f"compute.options.auth: service_principal needs ${missing[0]} "
                f"(and {', '.join('$' + v for v in SERVICE_PRINCIPAL_VARS if v != missing[0])})"
            )
    return kind


def _logged_in() -> bool:
    folder = Path(os.environ.get("AZURE_CONFIG_DIR") or Path.home() / ".azure")
    return any((folder / name).is_file() for name in LOGIN_CACHES)


def _interactive_terminal() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, OSError, ValueError):
        return False


def authentication(kind: str) -> Any:
    """The azureml authentication object for `kind` (see `credentials`)."""
    from azureml.core import authentication as auth

    if kind == "service_principal":
        return auth.ServicePrincipalAuthentication(
            tenant_id=os.environ["AZURE_TENANT_ID"],
            service_principal_id=os.environ["AZURE_CLIENT_ID"],
            service_principal_password=os.environ["AZURE_CLIENT_SECRET"],
        )
    if kind == "msi":
        return auth.MsiAuthentication()
    return auth.InteractiveLoginAuthentication()


_connected: dict[tuple[str, ...], Any] = {}
_connect_lock = threading.Lock()


def connect(ref: WorkspaceRef, kind: str) -> Any:
    """The azureml Workspace (one per workspace and authentication in this process)."""
    key = (ref.subscription_id, ref.resource_group, ref.workspace_name, kind)
    with _connect_lock:
        if key not in _connected:
            from azureml.core import Workspace

            try:
                _connected[key] = Workspace(
                    subscription_id=ref.subscription_id,
                    resource_group=ref.resource_group,
                    workspace_name=ref.workspace_name,
                    auth=authentication(kind),
                )
            except Exception as error:
                raise UserError(
                    f"cannot open Azure ML workspace {ref.workspace_name!r} (resource group "
                    f"{ref.resource_group!r}, from {ref.source}) with {kind} credentials: "
                    f"{first_line(error)}"
                ) from error
        return _connected[key]


def first_line(error: BaseException) -> str:
    """The message of an azureml exception (whose str() spans many lines), on one line."""
    message = getattr(error, "message", None)
    text = message if isinstance(message, str) and message.strip() else str(error)
    for line in text.splitlines():
        line = line.strip().removeprefix("Message:").strip()
        if line and not line.endswith("Exception:"):
            return line
    return type(error).__name__
