"""Python client for a cxrfed node.

    from cxrfed_client import Node
    node = Node("https://127.0.0.1:50051", profile="alice/profile.toml")
    node.extract("chest.dcm")
    node.stats('crosstab image_quality, analysis_confidence normalize=row')   # pandas.DataFrame
    node.export(where="view = PA")                                            # pandas.DataFrame
    node.dp_stats("histogram image_quality", epsilon=0.5)   # DP: values with ± bounds (researchers)
    node.budget()                                           # your privacy budget at this node

    from cxrfed_client import Coordinator
    study = Coordinator("https://127.0.0.1:50061", profile="rita/profile.toml")
    study.query("crosstab image_quality, view", epsilon=0.5)  # pooled over the sites, signed

Every call goes over mutual TLS with the certificates `cxrfed certs issue` wrote (or a profile
that names them); `http://` URLs reach only a node started with `--insecure-dev`. Errors are
raised as `CxrfedError` with the gRPC code and the node's message.
"""

from __future__ import annotations

import io
import os
import tomllib
import uuid
from pathlib import Path
from typing import Iterator

import grpc
import pandas as pd
from google.protobuf.json_format import MessageToDict

from cxrfed.v1 import coordinator_pb2, coordinator_pb2_grpc, node_pb2, node_pb2_grpc

__all__ = ["Node", "Coordinator", "CxrfedError"]

_CHUNK = 1024 * 1024
_MAX_MESSAGE = 8 * 1024 * 1024



def _mechanism(name: str) -> int:
    """`laplace` or `gaussian` as the wire's Mechanism value."""
    try:
        return node_pb2.Mechanism.Value(f"MECHANISM_{name.strip().upper()}")
    except ValueError:
        raise ValueError(f"mechanism {name!r} must be laplace or gaussian") from None

class CxrfedError(Exception):
    """A call the node refused: `code` is the gRPC status code name, `kind` the node's stable
    error kind (the `x-cxrfed-error` trailer) when it sent one."""

    def __init__(self, code: str, message: str, kind: str = ""):
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message
        self.kind = kind


def _error(e: grpc.RpcError) -> CxrfedError:
    kind = ""
    for key, value in (e.trailing_metadata() or ()):
        if key == "x-cxrfed-error":
            kind = value
    return CxrfedError(e.code().name, e.details() or "", kind)


def _read(path: str | os.PathLike | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def _credentials(url, ca, cert, key, profile, default_url):
    """Resolves a profile into (url, ca, cert, key) paths; explicit arguments win."""
    profile = profile or os.environ.get("CXRFED_PROFILE")
    if profile:
        base = Path(profile).parent
        with open(profile, "rb") as f:
            p = tomllib.load(f)
        resolve = lambda v: str(base / v) if v and not os.path.isabs(v) else v  # noqa: E731
        ca = ca or resolve(p.get("ca"))
        cert = cert or resolve(p.get("cert"))
        key = key or resolve(p.get("key"))
        url = url or p.get("node")
    return url or default_url, ca, cert, key


def _channel(url, ca, cert, key):
    options = [("grpc.max_receive_message_length", _MAX_MESSAGE),
               ("grpc.max_send_message_length", _MAX_MESSAGE)]
    if url.startswith("https://"):
        if ca is None:
            raise ValueError(f"{url} uses TLS: pass ca= (and cert=, key=) or profile=")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert))
        return grpc.secure_channel(url.removeprefix("https://"), credentials, options)
    if url.startswith("http://"):
        return grpc.insecure_channel(url.removeprefix("http://"), options)
    raise ValueError(f"URL {url!r} must start with https:// (or http:// for --insecure-dev)")


class Node:
    """A connection to one node."""

    def __init__(self, url: str | None = None, ca: str | None = None, cert: str | None = None,
                 key: str | None = None, profile: str | None = None):
        url, ca, cert, key = _credentials(url, ca, cert, key, profile, "https://127.0.0.1:50051")
        self._channel = _channel(url, ca, cert, key)
        self._stub = node_pb2_grpc.NodeServiceStub(self._channel)
        self.url = url

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Node":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request):
        try:
            return method(request)
        except grpc.RpcError as e:
            raise _error(e) from None

    def status(self) -> dict:
        return MessageToDict(self._call(self._stub.Status, node_pb2.StatusRequest()),
                             preserving_proto_field_name=True)

    def extract(self, path: str | os.PathLike, force: bool = False) -> dict:
        """Uploads one image (DICOM, JPEG or PNG) in chunks; returns its record as a dict, with
        `created` False when the node already had the same pixels."""
        size = os.path.getsize(path)

        def chunks() -> Iterator[node_pb2.ExtractRequest]:
            header = node_pb2.ExtractHeader(filename=os.path.basename(path), force=force,
                                            size_hint=size)
            with open(path, "rb") as f:
                first = True
                while True:
                    data = f.read(_CHUNK)
                    if not data and not first:
                        return
                    yield node_pb2.ExtractRequest(header=header if first else None, chunk=data)
                    first = False
                    if not data:
                        return

        response = self._call(self._stub.Extract, chunks())
        record = MessageToDict(response.record, preserving_proto_field_name=True)
        record["created"] = response.created
        return record

    def records(self, limit: int = 1000, view: str | None = None) -> list[dict]:
        """Stored records as dicts (nested, as the schema has them)."""
        out: list[dict] = []
        token = ""
        views = {"PA": 1, "AP": 2, "LL": 3, "UNKNOWN": 4}
        while len(out) < limit:
            request = node_pb2.ListRecordsRequest(page_size=min(1000, limit - len(out)),
                                                  page_token=token,
                                                  view=views.get((view or "").upper(), 0))
            token = ""
            try:
                for item in self._stub.ListRecords(request):
                    if item.HasField("record"):
                        out.append(MessageToDict(item.record, preserving_proto_field_name=True))
                    elif item.HasField("page_end"):
                        token = item.page_end.next_page_token
            except grpc.RpcError as e:
                raise _error(e) from None
            if not token:
                break
        return out[:limit]

    def ask(self, record_id: str, question: str) -> dict:
        """Asks a question about a record in English or Chinese; returns the answer as a dict
        (`understood`, `field`, `value`, `probability`, `yes_no`, `answer`, `suggestions`)."""
        uuid.UUID(record_id)
        response = self._call(self._stub.Ask,
                              node_pb2.AskRequest(record_id=record_id, question=question))
        answer = MessageToDict(response, preserving_proto_field_name=True,
                               always_print_fields_with_no_presence=True)
        answer.pop("record", None)
        return answer

    def define_field(self, name: str, type: str, values: list[str] | None = None,
                     min: float = 0.0, max: float = 0.0, description: str = "",
                     synonyms: list[str] | None = None) -> dict:
        """Defines a custom field (bool, categorical with `values`, numeric with `min`/`max`);
        redefining a name makes a new version."""
        field = node_pb2.FieldDefinition(name=name, type=type, values=values or [], min=min, max=max,
                                         description=description, synonyms=synonyms or [])
        defined = self._call(self._stub.DefineField, node_pb2.DefineFieldRequest(field=field))
        return MessageToDict(defined, preserving_proto_field_name=True)

    def fields(self) -> list[dict]:
        """The custom field definitions."""
        response = self._call(self._stub.ListFields, node_pb2.ListFieldsRequest())
        return [MessageToDict(f, preserving_proto_field_name=True) for f in response.fields]

    def annotate(self, field: str, value, record_id: str | None = None,
                 image_sha256: str | None = None, annotator: str | None = None) -> dict:
        """Labels one field (a custom field, or a correction of a finding) of one record (by
        `record_id` or `image_sha256`)."""
        if (record_id is None) == (image_sha256 is None):
            raise ValueError("give exactly one of record_id and image_sha256")
        if isinstance(value, bool):
            value = "true" if value else "false"
        request = node_pb2.AnnotateRequest(record_id=record_id or "", image_sha256=image_sha256 or "",
                                           field=field, value=str(value), annotator=annotator or "")
        response = self._call(self._stub.Annotate, request)
        return MessageToDict(response.annotation, preserving_proto_field_name=True)

    def stats(self, query: str) -> pd.DataFrame:
        """Exact statistics (site admin) as a DataFrame; the cohort size is in `df.attrs`."""
        response = self._call(self._stub.Stats, node_pb2.StatsRequest(query=query))
        rows = []
        for row in response.rows:
            values = []
            for cell in row.cells:
                which = cell.WhichOneof("value")
                values.append(getattr(cell, which) if which else None)
            rows.append(values)
        frame = pd.DataFrame(rows, columns=list(response.columns))
        if response.statistic == "crosstab" and not frame.empty:
            # The tabulated fields down the side become the index; `field=value` columns and
            # `total` stay columns.
            frame = frame.set_index([c for c in frame.columns if "=" not in c and c != "total"])
        frame.attrs.update(statistic=response.statistic, cohort_size=response.cohort_size,
                           record_count=response.record_count, query=query)
        return frame

    def dp_stats(self, query: str, epsilon: float, delta: float = 0.0,
                 mechanism: str = "laplace") -> pd.DataFrame:
        """Differentially private statistics, charged to your budget at the node.

        One row per released row: the label columns, then for each value column `NAME` (None
        when suppressed below the node's threshold) and `NAME_error_bound` (the 95% bound: the
        true value lies within ± it with 95% probability). `df.attrs` holds epsilon and delta
        charged, mechanism, noise scale, contributions per patient, suppression threshold,
        notes, the remaining budget and the audit entry."""
        request = node_pb2.DpStatsRequest(query=query, epsilon=epsilon, delta=delta,
                                          mechanism=_mechanism(mechanism))
        response = self._call(self._stub.DpStats, request)
        columns = list(response.label_columns)
        for name in response.value_columns:
            columns += [name, f"{name}_error_bound"]
        rows = []
        for row in response.rows:
            values = list(row.labels)
            for v in row.values:
                values += [v.value if v.HasField("value") else None, v.error_bound]
            rows.append(values)
        frame = pd.DataFrame(rows, columns=columns)
        if response.label_columns and not frame.empty:
            frame = frame.set_index(list(response.label_columns))
        budget = response.budget
        frame.attrs.update(
            statistic=response.statistic, query=response.query, epsilon=response.epsilon,
            delta=response.delta, mechanism=response.mechanism, noise_scale=response.noise_scale,
            confidence=response.confidence, contributions=response.contributions,
            suppress_below=response.suppress_below, threshold=response.threshold or None,
            notes=list(response.notes), epsilon_remaining=budget.epsilon_remaining,
            delta_remaining=budget.delta_remaining, audit_seq=response.audit_seq)
        return frame

    def budget(self) -> dict:
        """Your own privacy account at this node: budget, spent, remaining, releases."""
        return MessageToDict(self._call(self._stub.Budget, node_pb2.BudgetRequest()),
                             preserving_proto_field_name=True,
                             always_print_fields_with_no_presence=True)

    def export(self, where: str | None = None) -> pd.DataFrame:
        """Flattened records (site admin) as a DataFrame: one column per schema field, with
        `<field>_probability` alongside."""
        buffer = io.BytesIO()
        try:
            for chunk in self._stub.Export(node_pb2.ExportRequest(format="csv", where=where or "")):
                buffer.write(chunk.data)
        except grpc.RpcError as e:
            raise _error(e) from None
        buffer.seek(0)
        return pd.read_csv(buffer, keep_default_na=True)


class Coordinator:
    """A connection to the study coordinator, for federated DP queries. Every query is signed
    with the key of your certificate: each site checks the signature before it charges your
    budget there."""

    def __init__(self, url: str | None = None, ca: str | None = None, cert: str | None = None,
                 key: str | None = None, profile: str | None = None):
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        url, ca, cert, key = _credentials(url, ca, cert, key, profile, "https://127.0.0.1:50061")
        if url.startswith("http://") or cert is None or key is None:
            raise ValueError("a coordinator is reached over mutual TLS with your certificate and key")
        self._channel = _channel(url, ca, cert, key)
        self._stub = coordinator_pb2_grpc.CoordinatorServiceStub(self._channel)
        certificate = x509.load_pem_x509_certificate(_read(cert))
        self._certificate = certificate.public_bytes(serialization.Encoding.DER)
        self._key = serialization.load_pem_private_key(_read(key), password=None)
        uris = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
        self.identity = next(u for u in uris if u.startswith("cxrfed://"))
        self.study = self.identity.removeprefix("cxrfed://").split("/")[0]
        self.url = url

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Coordinator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def sites(self) -> pd.DataFrame:
        """The registry of sites (connected, last seen, version, model, records)."""
        try:
            response = self._stub.Sites(coordinator_pb2.SitesRequest())
        except grpc.RpcError as e:
            raise _error(e) from None
        return pd.DataFrame([MessageToDict(s, preserving_proto_field_name=True,
                                           always_print_fields_with_no_presence=True)
                             for s in response.sites])

    def models(self) -> pd.DataFrame:
        """The model registry: one row per global model version with its lineage (parent, job,
        round, algorithm, sites and samples, DP epsilon, sha256, promotion, sites running it)
        and its pooled held-out metrics as `metric.FIELD.NAME` columns."""
        try:
            response = self._stub.ListModels(coordinator_pb2.ListModelsRequest())
        except grpc.RpcError as e:
            raise _error(e) from None
        rows = []
        for m in response.models:
            row = MessageToDict(m, preserving_proto_field_name=True,
                                always_print_fields_with_no_presence=True)
            for key, value in row.pop("metrics", {}).items():
                row[f"metric.{key}"] = value
            rows.append(row)
        frame = pd.DataFrame(rows)
        return frame.set_index("version") if not frame.empty else frame

    @staticmethod
    def _word(enum, value) -> str:
        """An enum value as the word the CLI prints (`JOB_STATE_COMPLETED` -> `completed`)."""
        name = enum.Name(value)
        prefix = enum.Name(0).removesuffix("UNSPECIFIED")
        return name.removeprefix(prefix).lower()

    def jobs(self) -> pd.DataFrame:
        """The federated training jobs (state, rounds done, algorithm, base and latest model)."""
        try:
            response = self._stub.ListJobs(coordinator_pb2.ListJobsRequest())
        except grpc.RpcError as e:
            raise _error(e) from None
        frame = pd.DataFrame([{
            "job_id": j.job_id, "state": self._word(coordinator_pb2.JobState, j.state),
            "reason": j.reason, "rounds": j.rounds, "completed_rounds": j.completed_rounds,
            "algorithm": self._word(coordinator_pb2.Algorithm, j.algorithm),
            "base_model": j.base_model, "latest_model": j.latest_model,
            "created_at": j.created_at, "dp_epsilon": j.dp_epsilon} for j in response.jobs])
        return frame.set_index("job_id") if not frame.empty else frame

    def job(self, job_id: str) -> pd.DataFrame:
        """A job's round log, one row per round attempt and site (the study admin's view; a
        researcher's has no per-site rows and the frame is empty): status, noisy samples and
        held-out samples, the policy rule of a refusal, the ε the site charged, local seconds
        and the site's noisy counts for the model entering the round (`metric.FIELD.total`,
        `metric.FIELD.correct`); the closing evaluation is state "evaluation". `df.attrs`
        holds the job's state, reason and DP epsilon."""
        try:
            j = self._stub.GetJob(coordinator_pb2.GetJobRequest(job_id=job_id))
        except grpc.RpcError as e:
            raise _error(e) from None
        rows = []
        for r in j.round_log:
            for site in r.sites:
                row = {"round": r.round, "attempt": r.attempt,
                       "state": self._word(coordinator_pb2.RoundState, r.state),
                       "model_version": r.model_version, "site": site.site,
                       "status": self._word(coordinator_pb2.SiteRoundStatus, site.status),
                       "reason": site.reason, "samples": site.samples,
                       "eval_samples": site.eval_samples, "refused_rule": site.refused_rule,
                       "epsilon_charged": site.epsilon_charged,
                       "local_seconds": site.train_seconds}
                for key, value in site.metrics.items():
                    row[f"metric.{key}"] = value
                rows.append(row)
        frame = pd.DataFrame(rows)
        frame.attrs.update(job_id=j.job_id, state=self._word(coordinator_pb2.JobState, j.state),
                           reason=j.reason,
                           latest_model=j.latest_model, dp_epsilon=j.dp_epsilon)
        return frame

    def query(self, query: str, epsilon: float, delta: float = 0.0, mechanism: str = "laplace",
              sites: list[str] | None = None, min_sites: int = 1, timeout: float = 30.0) -> pd.DataFrame:
        """A federated DP query: every site charges `epsilon` (and `delta`) to your budget there
        and releases its own noisy answer; the coordinator pools them. Columns as in
        `Node.dp_stats` (`NAME`, `NAME_error_bound`); `df.attrs["sites"]` says which sites
        answered, which did not and why, and what each charged."""
        import time
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        now = int(time.time())
        intent = coordinator_pb2.QueryIntent(
            study=self.study, query=query, epsilon=epsilon, delta=delta,
            mechanism=_mechanism(mechanism),
            sites=sites or [], nonce=os.urandom(16).hex(), issued_at_unix=now,
            expires_at_unix=now + int(timeout) + 300).SerializeToString()
        signed = coordinator_pb2.SignedQuery(
            intent=intent, signature=self._key.sign(intent, ec.ECDSA(hashes.SHA256())),
            certificate=self._certificate)
        request = coordinator_pb2.FederatedQueryRequest(
            signed=signed, min_sites=min_sites, timeout_ms=int(timeout * 1000))
        try:
            response = self._stub.Query(request)
        except grpc.RpcError as e:
            raise _error(e) from None
        columns = list(response.label_columns)
        for name in response.value_columns:
            columns += [name, f"{name}_error_bound"]
        rows = []
        for row in response.rows:
            values = list(row.labels)
            for v in row.values:
                values += [v.value if v.HasField("value") else None, v.error_bound]
            rows.append(values)
        frame = pd.DataFrame(rows, columns=columns)
        if response.label_columns and not frame.empty:
            frame = frame.set_index(list(response.label_columns))
        frame.attrs.update(
            query_id=response.query_id, statistic=response.statistic, query=response.query,
            confidence=response.confidence, suppress_below=response.suppress_below,
            answered=response.answered, notes=list(response.notes), audit_seq=response.audit_seq,
            sites=[dict(MessageToDict(s, preserving_proto_field_name=True,
                                      always_print_fields_with_no_presence=True),
                        status=self._word(coordinator_pb2.SiteQueryStatus, s.status))
                   for s in response.sites])
        return frame
