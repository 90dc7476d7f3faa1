"""`meshcar inject`: add the meshcar sidecar to Kubernetes manifests (files or stdin).

Reads multi-document YAML (and `kind: List`), injects every workload that has not opted out,
writes the result to stdout and a one-line report per object (a List's items one by one) to
stderr. A workload that cannot be injected (hostNetwork, several ports and no
`meshcar.io/app-port`, a bad annotation) is written unchanged and reported as
`skipped (warning: ...)`, exit status 0; with `--strict` any such workload makes the whole
run write nothing and exit 1, so that a pipe into `kubectl apply -f -` never applies half of
a change. A manifest whose fields have the wrong type (`env` as a mapping, a container as a
string, ...) or that nests deeper than can be parsed always exits with status 2 and one line
per problem naming the field's path: it is not a valid manifest at all.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import yaml

from meshcar.inject.patch import (
    ANN_APP_PORT,
    ANN_APP_PROTOCOL,
    ANN_CAPTURE,
    ANN_INBOUND_TCP,
    ANN_TCP_UPSTREAMS,
    InjectError,
    InjectOptions,
    ShapeError,
    inject_object,
    is_injectable_kind,
    object_name,
    pod_template,
)


def build_parser(prog: str = "meshcar inject") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Add the meshcar sidecar to Kubernetes manifests."
    )
    parser.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        help="manifest file, or - for stdin (repeatable)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="a workload that cannot be injected fails the run (nothing written, exit 1) "
        "instead of being written unchanged with a warning",
    )
    add_option_arguments(parser)
    return parser


def add_option_arguments(parser: argparse.ArgumentParser) -> None:
    """The injection settings shared by `meshcar inject` and `meshcar webhook`."""
    d = InjectOptions()
    parser.add_argument(
        "--sidecar-mode",
        choices=("native", "classic"),
        default=d.sidecar_mode,
        help="native sidecar (initContainer, k8s >= 1.29; default) or classic container",
    )
    parser.add_argument("--image", default=d.image, help=f"sidecar image (default {d.image})")
    parser.add_argument("--ca-url", default=d.ca_url, help=f"CA API URL (default {d.ca_url})")
    parser.add_argument("--trust-domain", default=d.trust_domain, help=f"default {d.trust_domain}")
    parser.add_argument(
        "--ca-bundle",
        metavar="FILE",
        help="PEM root of the CA API, embedded in the config "
        "(default: mount ConfigMap meshcar-ca-bundle)",
    )
    parser.add_argument(
        "--capture",
        choices=("proxy", "transparent"),
        default=d.capture,
        help="proxy: HTTP_PROXY in the app containers (default); transparent: an iptables "
        "init container redirects the pod's TCP, no proxy variables",
    )
    parser.add_argument(
        "--egress",
        choices=("allow", "deny"),
        default=d.egress,
        help="hosts outside the mesh: allow (plain, as without the sidecar; default) or deny (502)",
    )
    parser.add_argument(
        "--token-audience",
        default=d.token_audience,
        help=f"audience of the projected token (default {d.token_audience})",
    )


def options_from_args(args: argparse.Namespace) -> InjectOptions:
    bundle = None
    if args.ca_bundle:
        try:
            with open(args.ca_bundle, encoding="ascii") as fh:
                bundle = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not ASCII"
            raise InjectError(f"--ca-bundle {args.ca_bundle}: cannot read: {reason}") from None
        if "-----BEGIN CERTIFICATE-----" not in bundle:
            raise InjectError(f"{args.ca_bundle}: not a PEM certificate")
    return InjectOptions(
        image=args.image,
        ca_url=args.ca_url,
        trust_domain=args.trust_domain,
        sidecar_mode=args.sidecar_mode,
        ca_bundle_pem=bundle,
        token_audience=args.token_audience,
        capture=args.capture,
        egress=args.egress,
    )


def inject_stream(
    text: str, options: InjectOptions, source: str = "<stdin>", *, strict: bool = False
) -> tuple[list[Any], list[str]]:
    """Inject every document of a YAML stream; returns (documents, report lines). A workload
    that cannot be injected is kept unchanged with a `skipped (warning: ...)` line, or, with
    `strict`, makes the call raise InjectError naming every such workload."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise InjectError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ShapeError(f"{source}: the YAML nests too deeply to be a manifest") from None
    run = _Run(options, source, strict)
    out: list[Any] = []
    for doc in docs:
        if _is_list(doc) and isinstance(doc.get("items"), list):
            out.append(dict(doc, items=[run.one(item) for item in doc["items"]]))
        else:
            out.append(run.one(doc))
    if run.errors:
        raise (ShapeError if run.wrong_shape else InjectError)("\n".join(run.errors))
    return out, run.report


class _Run:
    """One inject_stream call: each object injected or kept, its report line, and the
    errors that fail the run (wrong shapes always; any InjectError when strict)."""

    def __init__(self, options: InjectOptions, source: str, strict: bool) -> None:
        self.options, self.source, self.strict = options, source, strict
        self.report: list[str] = []
        self.errors: list[str] = []
        self.wrong_shape = False

    def one(self, item: Any) -> Any:
        try:
            new = inject_object(item, self.options)
        except RecursionError:
            self._fail(f"{object_name(item)}: nests too deeply to be a manifest", shape=True)
        except ShapeError as exc:
            self._fail(str(exc), shape=True)
        except InjectError as exc:
            if self.strict:
                self._fail(str(exc), shape=False)
            else:
                self.report.append(f"{object_name(item)} skipped (warning: {_reason(exc, item)})")
        else:
            self.report.append(f"{object_name(item)} {_verdict(item, new)}")
            return new
        return item

    def _fail(self, message: str, *, shape: bool) -> None:
        self.errors.append(f"{self.source}: {message}")
        self.wrong_shape = self.wrong_shape or shape


def _reason(exc: InjectError, item: Any) -> str:
    """The error without the object's name, which the report line already starts with."""
    text = str(exc)
    prefix = object_name(item) + ": "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _is_list(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("kind") == "List"


def _verdict(before: Any, after: Any) -> str:
    if after is not before:
        ann = _template_annotations(after)
        how = [ann.get(ANN_CAPTURE, "proxy")]
        if ann.get(ANN_APP_PORT) == "none":
            how.append("outbound only: no meshcar.io/app-port and no containerPort")
        else:
            how.append(f"app port {ann.get(ANN_APP_PORT)}")
        how += _protocols(ann)
        return f"injected ({'; '.join(how)})"
    if is_injectable_kind(before):
        return "skipped (already injected or meshcar.io/inject: disabled)"
    return "skipped (not a workload)"


def _protocols(ann: dict[str, str]) -> list[str]:
    """The gRPC and opaque TCP pieces the annotations asked for (already validated)."""
    out = []
    if ann.get(ANN_APP_PROTOCOL, "http1").strip() != "http1":
        out.append(f"app protocol {ann[ANN_APP_PROTOCOL].strip()}")
    if ann.get(ANN_INBOUND_TCP, "").strip():
        out.append(f"inbound tcp {ann[ANN_INBOUND_TCP].strip()}")
    if ann.get(ANN_TCP_UPSTREAMS, "").strip():
        out.append(f"tcp upstreams {ann[ANN_TCP_UPSTREAMS].strip()}")
    return out


def _template_annotations(obj: Any) -> dict[str, str]:
    return (pod_template(obj).get("metadata") or {}).get("annotations") or {}


def dump_documents(docs: Iterable[Any], out: TextIO) -> None:
    yaml.safe_dump_all(
        list(docs), out, sort_keys=False, default_flow_style=False, explicit_start=True
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = options_from_args(args)
        all_docs: list[Any] = []
        all_report: list[str] = []
        for name in args.filename:
            if name == "-":
                text, source = sys.stdin.read(), "<stdin>"
            else:
                try:
                    with open(name, encoding="utf-8") as fh:
                        text = fh.read()
                except OSError as exc:
                    raise InjectError(f"{name}: cannot read: {exc.strerror}") from None
                source = name
            docs, report = inject_stream(text, options, source, strict=args.strict)
            all_docs.extend(docs)
            all_report.extend(report)
    except InjectError as exc:
        for line in str(exc).splitlines():
            print(f"meshcar inject: {line}", file=sys.stderr)
        return 2 if isinstance(exc, ShapeError) else 1
    dump_documents(all_docs, sys.stdout)
    for line in all_report:
        print(line, file=sys.stderr)
    return 0
