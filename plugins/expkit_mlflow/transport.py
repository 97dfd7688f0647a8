"""HTTP to an MLflow tracking server, as MLflow's own client does it, without importing mlflow:
one keep-alive `requests` Session per server, urllib3's Retry for the transient failures, the
client's environment variables for credentials, TLS, timeouts and retries, and MLflow's error
body (`{"error_code": ..., "message": ...}`) turned into one line that names the server, the
call and what MLflow said.

The rules followed are mlflow's (3.x): `mlflow/utils/rest_utils.py` (`http_request`,
`verify_rest_response`), `mlflow/utils/request_utils.py` (the retried Session: retries on 408,
429, 500, 502, 503, 504 and on connection and read errors, any method, backoff_factor * 2^n
seconds plus up to backoff_jitter seconds, Retry-After respected) and
`mlflow/utils/credentials.py` (`get_default_host_creds`: basic auth from
MLFLOW_TRACKING_USERNAME/PASSWORD or `~/.mlflow/credentials`, else a bearer token from
MLFLOW_TRACKING_TOKEN; MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_SERVER_CERT_PATH,
MLFLOW_TRACKING_CLIENT_CERT_PATH).

`library_only` says when a configuration asks for something only the mlflow library does
(a request header or auth plugin, AWS SigV4, workspaces, multipart uploads): the sink then
uses the library (`expkit_mlflow.library`).
"""

from __future__ import annotations

import base64
import configparser
import json
import os
import re
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import requests

API = "/api/2.0/mlflow"
ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
# mlflow.utils.request_utils._TRANSIENT_FAILURE_RESPONSE_CODES
TRANSIENT = frozenset([408, 429, 500, 502, 503, 504])
# What the sink uses unless the user set these (`expkit_mlflow.tracking.HTTP_DEFAULTS` says
# why: MLflow's own defaults, 7 retries and 120 s, would hold a run up for minutes).
RETRIES, BACKOFF, TIMEOUT = 2, 1, 60  # MLflow reads each as an int
# The configurations only the mlflow library can honour: environment variables (true when set
# to anything but "", "false" or "0"), and entry point groups of mlflow plugins that change
# what a request to a server carries.
LIBRARY_VARIABLES = (
    "MLFLOW_TRACKING_AUTH",  # an auth plugin (mlflow.request_auth_provider)
    "MLFLOW_TRACKING_AWS_SIGV4",  # AWS SigV4 signatures
    "MLFLOW_WORKSPACE",  # the workspace header of a multi-workspace server
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD",  # uploads in parts
)
LIBRARY_PLUGINS = ("mlflow.request_header_provider", "mlflow.request_auth_provider")
STORE_PLUGINS = ("mlflow.tracking_store", "mlflow.artifact_repository")
SCHEMES = ("http", "https", "mlflow-artifacts")


class MlflowServerError(Exception):
    """A call to an MLflow server failed: `error_code` is MLflow's (RESOURCE_DOES_NOT_EXIST,
    RESOURCE_ALREADY_EXISTS, INVALID_PARAMETER_VALUE, ...), or the HTTP status's name when the
    server said nothing MLflow-shaped, or "CONNECTION" when it could not be reached."""

    def __init__(self, message: str, error_code: str, status: int | None = None) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.status = status


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "false", "0")


def library_only(uri: str) -> str | None:
    """Why a tracking URI must go through the mlflow library rather than the REST client;
    None when the REST client does what the library would. Only http:// and https:// URIs
    without a configuration that needs the library qualify (see the module's docstring)."""
    scheme = uri.split(":", 1)[0].lower()
    if scheme not in ("http", "https"):
        return f"a {scheme or 'local'} store"
    for name in LIBRARY_VARIABLES:
        if _flag(name):
            return f"{name} is set"
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS") and os.environ.get(
        "MLFLOW_TRACKING_SERVER_CERT_PATH"
    ):
        return "both MLFLOW_TRACKING_INSECURE_TLS and MLFLOW_TRACKING_SERVER_CERT_PATH are set"
    installed = entry_points()  # one scan of the installed distributions (~50 ms)
    for group in (*LIBRARY_PLUGINS, *STORE_PLUGINS):
        found = [e.name for e in installed.select(group=group)]
        if group in STORE_PLUGINS:
            found = [name for name in found if name in SCHEMES]
        if found:
            return f"an mlflow plugin is installed ({group}: {', '.join(found)})"
    return None


@dataclass(frozen=True)
class Settings:
    """How requests to the server are made: from MLflow's client environment variables,
    read when the client is made (as MLflow reads them per request)."""

    headers: dict[str, str]
    verify: bool | str  # TLS: verify (True), don't (False), or with this CA bundle
    cert: str | None  # a client certificate (.pem)
    retries: int
    backoff: float  # seconds: backoff * 2^n between retries
    jitter: float  # seconds: up to this much more
    timeout: float  # seconds, to connect and for each read
    retry_after: bool  # honour a 429's or 503's Retry-After
    redirects: bool

    @classmethod
    def from_environment(cls) -> Settings:
        """MLflow's client settings as the environment gives them (defaults: `RETRIES`,
        `BACKOFF`, `TIMEOUT`; MLflow's own for the rest). Raises ValueError for a value
        that is not a number."""
        headers = {"User-Agent": "expkit (MLflow REST API)"}
        username, password = _basic_credentials()
        token = os.environ.get("MLFLOW_TRACKING_TOKEN")
        if username and password:
            pair = f"{username}:{password}".encode()
            headers["Authorization"] = "Basic " + base64.standard_b64encode(pair).decode()
        elif token:
            headers["Authorization"] = f"Bearer {token}"
        server_cert = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
        verify: bool | str = server_cert or not _flag("MLFLOW_TRACKING_INSECURE_TLS")
        return cls(
            headers=headers,
            verify=verify,
            cert=os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH") or None,
            retries=int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", RETRIES)),
            backoff=float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", BACKOFF)),
            jitter=float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", 1.0)),
            timeout=float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", TIMEOUT)),
            retry_after=os.environ.get("MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER", "true").lower()
            in ("true", "1"),
            redirects=os.environ.get("MLFLOW_ALLOW_HTTP_REDIRECTS", "true").lower()
            in ("true", "1"),
        )


def _basic_credentials() -> tuple[str | None, str | None]:
    """Username and password: the environment's, else `~/.mlflow/credentials`'s [mlflow]
    section (mlflow.utils.credentials.read_mlflow_creds)."""
    username = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if username and password:
        return username, password
    path = Path("~/.mlflow/credentials").expanduser()
    if path.is_file():
        config = configparser.ConfigParser()
        config.read(path)
        if "mlflow" in config:
            section = config["mlflow"]
            username = username or section.get("mlflow_tracking_username")
            password = password or section.get("mlflow_tracking_password")
    return username, password


class Server:
    """One MLflow tracking server (its base URL: `http://host:5000`, or with a path prefix),
    over one keep-alive Session with MLflow's retry policy."""

    def __init__(self, url: str, settings: Settings | None = None) -> None:
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util import Retry

        self.url = url.rstrip("/")
        self.settings = settings or Settings.from_environment()
        s = self.settings
        policy: dict[str, Any] = {
            "total": s.retries,
            "connect": s.retries,
            "read": s.retries,
            "redirect": s.retries,
            "status": s.retries,
            "status_forcelist": TRANSIENT,
            "backoff_factor": s.backoff,
            "raise_on_status": False,
            "respect_retry_after_header": s.retry_after,
            "allowed_methods": None,  # any method, as MLflow retries them all
        }
        try:
            retry = Retry(**policy, backoff_jitter=s.jitter)
        except TypeError:  # urllib3 < 2 has no jitter (MLflow adds its own: JitteredRetry)
            retry = Retry(**policy)
        self.session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.update(s.headers)

    def call(
        self,
        method: str,
        endpoint: str,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """`method` on `API/endpoint` ("runs/get", ...) with a JSON body or a query; the
        JSON answer. Raises MlflowServerError, which names the server, the call and MLflow's
        answer."""
        data = None if body is None else json.dumps(body, allow_nan=False)
        answer = self.request(
            method,
            f"{self.url}{API}/{endpoint}",
            endpoint,
            data=data,
            params=params,
            headers={"Content-Type": "application/json"} if data is not None else None,
        )
        text = answer.text.strip()
        try:
            found = json.loads(text) if text else {}
        except ValueError:
            found = None
        if not isinstance(found, dict):
            raise MlflowServerError(
                f"MLflow server {self.url}, {endpoint}: not an MLflow answer: {text[:200]!r}",
                "INTERNAL_ERROR",
                answer.status_code,
            )
        return found

    def request(self, method: str, url: str, what: str, **kwargs: Any) -> requests.Response:
        """An HTTP request to `url` (on this server, or its artifact server), retried as
        MLflow retries; the response, when its status is 200. Raises MlflowServerError,
        `what` naming the call."""
        import requests

        try:
            answer = self.session.request(
                method,
                url,
                timeout=self.settings.timeout,
                allow_redirects=self.settings.redirects,
                # Per request, as MLflow passes them: a Session's own would lose to
                # $REQUESTS_CA_BUNDLE (requests' merge_environment_settings).
                verify=self.settings.verify,
                cert=self.settings.cert,
                **kwargs,
            )
        except requests.exceptions.Timeout as error:
            raise MlflowServerError(
                f"MLflow server {self.url}, {what}: no answer within "
                f"{self.settings.timeout:g} s (MLFLOW_HTTP_REQUEST_TIMEOUT)",
                "TIMEOUT",
            ) from error
        except requests.exceptions.RequestException as error:
            raise MlflowServerError(
                f"MLflow server {self.url}, {what}: {_reason(error)}", "CONNECTION"
            ) from error
        if answer.status_code != 200:
            raise _refused(self.url, what, answer)
        return answer


def _refused(url: str, what: str, answer: requests.Response) -> MlflowServerError:
    """The error for a non-200 answer: MLflow's error code and message when the body is
    MLflow's error JSON, else the status and the start of the body."""
    try:
        body = answer.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "error_code" in body:
        code = str(body["error_code"])
        message = " ".join(str(body.get("message", "")).split())
        return MlflowServerError(
            f"MLflow server {url}, {what}: {code}: {message}", code, answer.status_code
        )
    text = " ".join(answer.text.split())[:200]
    name = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "ENDPOINT_NOT_FOUND"}.get(
        answer.status_code, f"HTTP_{answer.status_code}"
    )
    return MlflowServerError(
        f"MLflow server {url}, {what}: HTTP {answer.status_code} {answer.reason}"
        + (f": {text}" if text else ""),
        name,
        answer.status_code,
    )


def _reason(error: BaseException) -> str:
    """The innermost reason of a requests/urllib3 connection error, in one line: "Connection
    refused" rather than the pool's nested repr."""
    reason: Any = error
    while True:
        inner = getattr(reason, "reason", None)
        if inner is None and reason.args and isinstance(reason.args[0], BaseException):
            inner = reason.args[0]
        if inner is None or inner is reason or not isinstance(inner, BaseException):
            break
        reason = inner
    text = " ".join(str(reason).split())
    # urllib3 prefixes its connection: "HTTPConnection(host='h', port=1): Failed to ..."
    text = re.sub(r"^(<[^>]*>|HTTPS?Connection\([^)]*\)): ", "", text)
    return text or type(reason).__name__
