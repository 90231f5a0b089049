#!/usr/bin/env python3
"""Verifies an EKM signed audit export with the public signing key alone.

An independent implementation of docs/audit-format.md, written from that document: the
Python standard library plus `cryptography` (for Ed25519). No database, no EKM code.

    python3 docs/verify_export.py --file export.jsonl --public-key key.pub [--json]

key.pub holds the base64 text of `GET /v1/audit/signing-key`'s `public_key` (or the output
of `ekm audit signing-key`). Exit 0: intact. Exit 1: the first altered, missing, inserted,
reordered or truncated line is named. Exit 2: the command itself was used wrongly.
"""

import argparse
import base64
import binascii
import hashlib
import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

FORMAT = "ekm-audit-export"
VERSION = 1
LABEL = "ekm-audit-export-checkpoint-v1"
ZERO = "0" * 64
MAX_LINE_BYTES = 1024 * 1024
MAX_NESTING = 64
MAX_NUMBER = 1.7976931348623157e308


class Failure(Exception):
    def __init__(self, line, problem, detail):
        super().__init__(detail)
        self.line, self.problem, self.detail = line, problem, detail


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def checkpoint_message(n, prev, final):
    return f"{LABEL}\n{n}\n{prev}\n{'final' if final else 'more'}".encode()


def signature_ok(public_key, message, signature):
    try:
        raw = base64.b64decode(signature, validate=True)
        # One text per signature: no unused bits set, no other padding.
        if base64.b64encode(raw).decode() != signature:
            return False
        public_key.verify(raw, message)
        return True
    except (InvalidSignature, binascii.Error, ValueError, TypeError):
        return False


def nesting(raw):
    """The deepest nesting of arrays and objects in a line, outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for b in raw:
        if in_string:
            if escaped:
                escaped = False
            elif b == 0x5C:
                escaped = True
            elif b == 0x22:
                in_string = False
            continue
        if b == 0x22:
            in_string = True
        elif b in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif b in (0x5D, 0x7D):
            depth = max(depth - 1, 0)
    return deepest


class Negative(int):
    """An integer written with a minus sign (never a line number)."""


def parse_int(text):
    value = int(text)
    if abs(value) > MAX_NUMBER:
        raise ValueError("number out of range")
    return Negative(value) if text.startswith("-") else value


def parse_float(text):
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


def reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def parse(raw):
    """(object or None, n or None, prev or None) of one line's bytes: standard JSON only
    (no NaN or Infinity, numbers within a double's range, no lone surrogates), nested at
    most MAX_NESTING deep, at most MAX_LINE_BYTES long."""
    if len(raw) > MAX_LINE_BYTES or nesting(raw) > MAX_NESTING:
        return None, None, None
    try:
        value = json.loads(raw.decode("utf-8"), parse_int=parse_int, parse_float=parse_float,
                           parse_constant=reject_constant)
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # lone surrogates fail here
    except (UnicodeError, ValueError, RecursionError):
        return None, None, None
    if not isinstance(value, dict):
        return None, None, None
    n = value.get("n")
    valid = (isinstance(n, int) and not isinstance(n, (bool, Negative)) and 0 <= n < 2**64)
    n = n if valid else None
    prev = value.get("prev") if isinstance(value.get("prev"), str) else None
    return value, n, prev


def misplaced(line, parsed, hashes, by_number, public_key):
    """Why line `line` is not where the chain expects it (see the format's section 5)."""
    index = line - 1
    value, n, prev = parsed[index]
    expected_prev = ZERO if index == 0 else hashes[index - 1]
    if n is not None and n > line and len(by_number.get(n, [])) == 1:
        later = [i for i in by_number.get(line, []) if i > index]
        if later:
            return Failure(line, "reordered",
                           f"line {line} holds line {n} of the export; "
                           f"line {line} of the export is at line {later[0] + 1}")
    if index + 1 < len(parsed) and parsed[index + 1][2] == expected_prev:
        return Failure(line, "inserted",
                       f"line {line} is not part of the export: "
                       f"line {line + 1} follows line {line - 1} directly")
    if n is not None and n > line:
        return Failure(line, "missing", f"line {line} of the export is missing "
                       f"(line {line} holds line {n})")
    if n is not None and n < line:
        return Failure(line, "inserted",
                       f"line {line} repeats line number {n}, which the export already used")
    if n is not None and line > 1:
        if index + 1 < len(parsed):
            vouched = parsed[index + 1][2] == hashes[index]
        else:
            vouched = (value.get("kind") == "checkpoint" and signature_ok(
                public_key,
                checkpoint_message(line, prev or "", value.get("final") is True),
                value.get("signature") or ""))
        if vouched:
            return Failure(line - 1, "altered",
                           f"line {line - 1} does not hash to the value that line {line} "
                           "recorded as its predecessor")
        return Failure(line, "altered", f"line {line}'s record of its predecessor was altered")
    return Failure(line, "altered", f"line {line} has no valid line number or predecessor hash")


def verify(data, public_key_bytes):
    public_key = Ed25519PublicKey.from_public_bytes(public_key_bytes)
    key_id = hashlib.sha256(public_key_bytes).hexdigest()[:32]
    lines = data.split(b"\n")
    terminated = lines[-1] == b""
    if terminated:
        lines.pop()
    if not lines:
        raise Failure(1, "truncated", "the export is empty")
    parsed = [parse(raw) for raw in lines]
    hashes = [sha256_hex(raw) for raw in lines]
    by_number = {}
    for i, (_, n, _) in enumerate(parsed):
        if n is not None:
            by_number.setdefault(n, []).append(i)
    summary = {"entries": 0, "checkpoints": 0, "lines": len(lines)}
    ended = False
    last_checkpoint = 0
    for index, (value, n, prev) in enumerate(parsed):
        line = index + 1
        expected_prev = ZERO if index == 0 else hashes[index - 1]
        if ended:
            raise Failure(line, "inserted",
                          f"line {line} follows the final signed checkpoint, where the export ends")
        if len(lines[index]) > MAX_LINE_BYTES:
            raise Failure(line, "altered", f"line {line} is longer than {MAX_LINE_BYTES} bytes")
        if index == len(lines) - 1 and not terminated:
            raise Failure(line, "altered", f"line {line} does not end with a newline")
        if value is None:
            raise Failure(line, "altered", f"line {line} is not a JSON object")
        if prev != expected_prev or n != line:
            raise misplaced(line, parsed, hashes, by_number, public_key)
        kind = value.get("kind")
        if line == 1:
            if kind != "header":
                raise Failure(1, "altered", "line 1 is not the export's header")
            if value.get("format") != FORMAT or value.get("version") != VERSION:
                raise Failure(1, "altered", f"the header does not name {FORMAT} version {VERSION}")
            if value.get("key_id") != key_id:
                raise Failure(1, "wrong_key", f"the export was signed with key {value.get('key_id')}; "
                              f"the public key given is key {key_id}")
            summary["org_id"] = value.get("org_id")
            summary["through_position"] = value.get("through_position")
            summary["exported_at"] = value.get("exported_at")
            summary["filter"] = value.get("filter")
        elif kind in ("event", "access"):
            summary["entries"] += 1
        elif kind == "checkpoint":
            final = value.get("final") is True
            signature = value.get("signature") if isinstance(value.get("signature"), str) else ""
            exact = (f'{{"n":{line},"kind":"checkpoint","prev":"{expected_prev}",'
                     f'"final":{"true" if final else "false"},"signature":"{signature}"}}')
            if lines[index] != exact.encode():
                raise Failure(line, "altered", f"the checkpoint at line {line} is not in the "
                              "exact form of a checkpoint line")
            if not signature_ok(public_key, checkpoint_message(line, expected_prev, final),
                                signature):
                raise Failure(line, "altered",
                              f"the signed checkpoint at line {line} does not verify: a line from "
                              f"{last_checkpoint + 1} to {line - 1} was altered and the chain after "
                              "it recomputed, or the checkpoint itself was")
            summary["checkpoints"] += 1
            last_checkpoint = line
            ended = final
        else:
            raise Failure(line, "altered", f"line {line} has no known kind")
    if not ended:
        raise Failure(len(lines) + 1, "truncated",
                      f"the export ends after line {len(lines)} without its final signed "
                      "checkpoint: lines were removed from its end")
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", required=True, help="the export (JSON Lines)")
    parser.add_argument("--public-key", required=True, help="file holding the base64 public key")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    try:
        with open(args.public_key, "rb") as f:
            key = base64.b64decode(f.read().strip(), validate=True)
        if len(key) != 32:
            raise ValueError(f"{len(key)} bytes, not 32")
        with open(args.file, "rb") as f:
            data = f.read()
    except (OSError, ValueError, binascii.Error) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        summary = verify(data, key)
    except Failure as failure:
        if args.json:
            print(json.dumps({"ok": False, "first_failure": {
                "line": failure.line, "problem": failure.problem, "detail": failure.detail}}))
        else:
            print(f"TAMPERED  {args.file}  line {failure.line}: {failure.problem} ({failure.detail})")
        return 1
    if args.json:
        print(json.dumps({"ok": True, "export": summary}))
    else:
        print(f"ok        {summary.get('org_id')}  {summary['entries']} entries, "
              f"{summary['lines']} lines, {summary['checkpoints']} signed checkpoints, "
              f"through position {summary.get('through_position')}, "
              f"exported at {summary.get('exported_at')}")
        partial = {k: v for k, v in (summary.get("filter") or {}).items() if k != "org"}
        if partial:
            print("          a partial export: only the entries matching "
                  + " ".join(f"{k}={v}" for k, v in sorted(partial.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
