"""`meshcar inject`: add the meshcar sidecar to Kubernetes manifests (files or stdin).

Reads multi-document YAML (and `kind: List`), injects every workload that has not opted out,
writes the result to stdout and a one-line report per object to stderr. If any object cannot
be injected, nothing is written to stdout and the exit status is 1, so that a pipe into
`kubectl apply -f -` never applies half of a change. A manifest whose fields have the wrong
type (`env` as a mapping, a container as a string, ...) or that nests deeper than can be
parsed exits with status 2 and one line per problem naming the field's path.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import yaml

from meshcar.inject.patch import (
    InjectError,
    InjectOptions,
    ShapeError,
    inject_document,
    is_injectable_kind,
    object_name,
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
    )


def inject_stream(
    text: str, options: InjectOptions, source: str = "<stdin>"
) -> tuple[list[Any], list[str]]:
    """Inject every document of a YAML stream; returns (documents, report lines)."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise InjectError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ShapeError(f"{source}: the YAML nests too deeply to be a manifest") from None
    out: list[Any] = []
    report: list[str] = []
    errors: list[str] = []
    wrong_shape = False
    for doc in docs:
        try:
            new = inject_document(doc, options)
        except InjectError as exc:
            errors.append(f"{source}: {exc}")
            wrong_shape = wrong_shape or isinstance(exc, ShapeError)
            continue
        except RecursionError:
            errors.append(f"{source}: {object_name(doc)}: nests too deeply to be a manifest")
            wrong_shape = True
            continue
        report.extend(_report_lines(doc, new))
        out.append(new)
    if errors:
        raise (ShapeError if wrong_shape else InjectError)("\n".join(errors))
    return out, report


def _is_list(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("kind") == "List"


def _report_lines(doc: Any, new: Any) -> list[str]:
    """One line per object of the document (a List's items one by one): injected or why not."""
    items = doc["items"] if _is_list(doc) and isinstance(doc.get("items"), list) else [doc]
    new_items = new["items"] if new is not doc and _is_list(new) else None
    return [
        f"{object_name(item)} {_verdict(item, new_items[i] if new_items is not None else new)}"
        for i, item in enumerate(items)
    ]


def _verdict(before: Any, after: Any) -> str:
    if after is not before:
        return "injected"
    if is_injectable_kind(before):
        return "skipped (already injected or meshcar.io/inject: disabled)"
    return "skipped (not a workload)"


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
            docs, report = inject_stream(text, options, source)
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
