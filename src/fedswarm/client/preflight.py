"""What a client daemon checks before it connects: its --coordinator address, its --data and its --model.

Each problem is a BadInput naming the flag or file; `fedswarm client` prints it as one line and exits 2.
What depends on the run (its text field, its model when --model is not given) is checked after the join,
with the same error and exit code."""
from __future__ import annotations

import ipaddress

from fedswarm import tokenized
from fedswarm.client.options import ClientOptions
from fedswarm.data import parse_partition
from fedswarm.errors import BadInput
from fedswarm.models import check_model

NO_DATA_ROLES = ("peer",)   # a stage peer serves activations; it reads no --data


def check_address(address: str, flag: str = "--coordinator") -> None:
    """BadInput unless `address` is HOST:PORT with a port in 1..65535 (IPv6 as [ADDR]:PORT)."""
    host, sep, port = address.rpartition(":")
    example = f"e.g. {flag} 127.0.0.1:7000"
    if not sep or not host:
        raise BadInput(f"{flag} {address!r}: expected HOST:PORT with the coordinator's port, {example}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise BadInput(f"{flag} {address!r}: the port must be a number from 1 to 65535, {example}")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in host and not host.startswith("["):
        raise BadInput(f"{flag} {address!r}: write an IPv6 address in brackets, e.g. [::1]:7000")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(bare)
        except ValueError:
            raise BadInput(f"{flag} {address!r}: {bare!r} in brackets is not an IPv6 address") from None


def data_fields(options: ClientOptions) -> list[tuple[str, str]]:
    """The record fields the client's own flags name (the run's own are known only after the join)."""
    fmt = options.format
    named = [(options.text_field, "--text-field", fmt in (None, "text")),
             (options.prompt_field, "--prompt-field", fmt in (None, "chat")),
             (options.response_field, "--response-field", fmt in (None, "chat"))]
    return [(field, flag) for field, flag, applies in named if applies and field]


def check_options(options: ClientOptions) -> None:
    """Everything about this client's flags and files that can be checked without the coordinator."""
    check_address(options.coordinator)
    try:
        parse_partition(options.partition)
    except ValueError as err:
        raise BadInput(f"--partition: {err}") from None
    if options.role not in NO_DATA_ROLES:
        tokenized.check_source(options.data, data_fields(options))
    if options.model:
        check_model(options.model)
