"""Conformance of dynkv with the official Riak Python client (`riak` 2.7.0 from PyPI).

Usage: conformance.py http|pbc HOST PORT [OTHER_PORT]
OTHER_PORT is the same node's port of the other transport, for the check that a vclock read
over one API works over the other. Runs each check against a running dynkv node through the client's HTTP or Protocol Buffers
transport and prints one line per check, then `N passed, M failed`. Exit status 1 if any
check failed. Each run uses buckets of its own, so runs do not see each other's data.
"""

import compat  # noqa: F401  (must come before `import riak`)

import sys
import traceback
import uuid

from riak import RiakClient, RiakError

TRANSPORT, HOST, PORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
OTHER_PORT = int(sys.argv[4]) if len(sys.argv) > 4 else None
if TRANSPORT == "http":
    client = RiakClient(protocol="http", host=HOST, http_port=PORT)
else:
    client = RiakClient(protocol="pbc", host=HOST, pb_port=PORT)
PREFIX = "conformance-%s-%s-" % (TRANSPORT, uuid.uuid4().hex[:8])
results = []


def bucket(name):
    return client.bucket(PREFIX + name)


def check(name):
    def run(function):
        try:
            function()
            results.append((name, None))
        except Exception as error:  # any failure of the client or an assertion
            detail = "%s: %s" % (type(error).__name__, error)
            if not isinstance(error, AssertionError):
                detail += "\n" + traceback.format_exc(limit=3)
            results.append((name, detail))
        return function

    return run


@check("ping")
def _():
    assert client.ping() is True


@check("store and fetch JSON")
def _():
    b = bucket("json")
    b.new("k", data={"a": 1, "b": [1, 2]}).store()
    fetched = b.get("k")
    assert fetched.exists
    assert fetched.data == {"a": 1, "b": [1, 2]}, fetched.data
    assert fetched.content_type == "application/json", fetched.content_type


@check("store and fetch binary, content types")
def _():
    b = bucket("binary")
    raw = bytes(range(256))
    b.new("k", encoded_data=raw, content_type="application/octet-stream").store()
    fetched = b.get("k")
    assert fetched.encoded_data == raw, fetched.encoded_data
    assert fetched.content_type == "application/octet-stream", fetched.content_type
    b.new("t", data="hello", content_type="text/plain").store()
    text = b.get("t")
    assert text.data == "hello", text.data
    assert text.content_type == "text/plain", text.content_type


@check("user metadata")
def _():
    b = bucket("meta")
    stored = b.new("k", data={"x": 1})
    stored.usermeta = {"color": "blue", "owner": "me"}
    stored.store()
    assert b.get("k").usermeta == {"color": "blue", "owner": "me"}, b.get("k").usermeta


@check("quorum parameters and return_body")
def _():
    b = bucket("quorum")
    stored = b.new("k", data={"v": 1})
    stored.store(w=2, dw=1, pw=1, return_body=True)
    assert stored.vclock is not None
    assert stored.data == {"v": 1}
    other = b.new("k2", data={"v": 2})
    other.store(w="quorum", return_body=False)
    assert b.get("k2", r=2, pr=1).data == {"v": 2}
    assert b.get("k2", r="all").exists
    assert b.get("k2", r="one").exists
    b.get("k2").delete(r=2, w=2, dw=1, pr=1, pw=1)
    assert not b.get("k2").exists


@check("an unmeetable quorum is an error")
def _():
    b = bucket("quorum-error")
    try:
        b.new("k", data=1).store(w=5)
    except RiakError:
        return
    raise AssertionError("w=5 with n_val=3 was accepted")


@check("missing key")
def _():
    missing = bucket("missing").get("nope")
    assert missing.exists is False
    assert missing.siblings == []
    assert missing.data is None


@check("server-assigned key")
def _():
    b = bucket("assigned")
    stored = b.new(None, data={"assigned": True})
    stored.store(return_body=True)
    assert stored.key, "no key was assigned"
    assert b.get(stored.key).data == {"assigned": True}


@check("delete then fetch")
def _():
    b = bucket("delete")
    b.new("k", data=1).store()
    b.get("k").delete()
    assert b.get("k").exists is False
    b.delete("never-written")
    assert b.get("never-written").exists is False


@check("bucket properties")
def _():
    b = bucket("props")
    b.set_properties({"n_val": 3, "allow_mult": True})
    props = b.get_properties()
    assert props["n_val"] == 3, props
    assert props["allow_mult"] is True, props
    assert b.allow_mult is True
    b.allow_mult = False
    assert b.get_properties()["allow_mult"] is False
    b.clear_properties()
    assert b.get_properties()["n_val"] == 3


@check("siblings from two writers, resolved with the vclock")
def _():
    b = bucket("siblings")
    b.allow_mult = True
    b.new("k", data={"writer": "left"}).store()
    b.new("k", data={"writer": "right"}).store()
    fetched = b.get("k")
    writers = sorted(sibling.data["writer"] for sibling in fetched.siblings)
    assert writers == ["left", "right"], writers
    fetched.siblings = [fetched.siblings[0]]
    fetched.store()
    resolved = b.get("k")
    assert len(resolved.siblings) == 1, len(resolved.siblings)


@check("list keys")
def _():
    b = bucket("keys")
    # A listing asks one replica per partition, as Riak's does: written to all three, every
    # key is there to list however the write's acknowledgements raced.
    for index in range(5):
        b.new("k%d" % index, data=index).store(w="all")
    keys = sorted(b.get_keys())
    assert keys == ["k%d" % index for index in range(5)], keys


@check("keys with spaces and plus signs")
def _():
    b = bucket("names")
    b.new("a b", data="spaced").store(w="all")
    b.new("c+d", data="plus").store(w="all")
    assert b.get("a b").data == "spaced"
    assert b.get("c+d").data == "plus"
    assert sorted(b.get_keys()) == ["a b", "c+d"], sorted(b.get_keys())


@check("list buckets")
def _():
    bucket("listed").new("k", data=1).store(w="all")
    names = [listed.name for listed in client.get_buckets()]
    assert PREFIX + "listed" in names, names


@check("if_none_match refuses an existing key")
def _():
    b = bucket("conditional")
    b.new("k", data=1).store()
    try:
        b.new("k", data=2).store(if_none_match=True)
    except RiakError:
        assert b.get("k").data == 1
        return
    raise AssertionError("a store with if_none_match over an existing key was accepted")


@check("what is not served is refused with an error")
def _():
    try:
        client.get_index(bucket("index"), "field_bin", "x")
    except RiakError as error:
        if TRANSPORT == "pbc":
            assert "not served" in str(error), str(error)
        return
    raise AssertionError("a secondary index query was answered")


if TRANSPORT == "pbc":

    @check("default bucket type properties")
    def _():
        # This client refuses any request about the default type before sending it; other
        # libraries send RpbGetBucketTypeReq (31). Sent here as they would, on a socket.
        import socket
        import struct

        def ask(bucket_type):
            body = b"\x0a" + bytes([len(bucket_type)]) + bucket_type
            with socket.create_connection((HOST, PORT)) as connection:
                connection.sendall(struct.pack("!IB", len(body) + 1, 31) + body)
                length = struct.unpack("!I", connection.recv(4, socket.MSG_WAITALL))[0]
                frame = connection.recv(length, socket.MSG_WAITALL)
            return frame[0], frame[1:]

        code, body = ask(b"default")
        assert code == 20, (code, body)
        from riak.pb.riak_pb2 import RpbGetBucketResp

        props = RpbGetBucketResp()
        props.ParseFromString(body)
        assert props.props.n_val == 3, props
        code, body = ask(b"maps")
        assert code == 0 and b"not served" in body, (code, body)

    @check("client id")
    def _():
        # RiakClient.client_id is broken in this client (it sends nothing and leaves its
        # pool claimed); its transport sends RpbSetClientIdReq and RpbGetClientIdReq.
        with client._transport() as transport:
            transport.client_id = "conformance"
            assert transport.client_id in ("conformance", b"conformance"), transport.client_id


if OTHER_PORT:

    @check("a vclock read over one API resolves siblings over the other")
    def _():
        if TRANSPORT == "http":
            other = RiakClient(protocol="pbc", host=HOST, pb_port=OTHER_PORT)
        else:
            other = RiakClient(protocol="http", host=HOST, http_port=OTHER_PORT)
        try:
            name = PREFIX + "cross"
            client.bucket(name).allow_mult = True
            client.bucket(name).new("k", data={"writer": "left"}).store()
            client.bucket(name).new("k", data={"writer": "right"}).store()
            fetched = other.bucket(name).get("k")
            assert len(fetched.siblings) == 2, len(fetched.siblings)
            fetched.siblings = [fetched.siblings[0]]
            fetched.store()
            resolved = client.bucket(name).get("k")
            assert len(resolved.siblings) == 1, len(resolved.siblings)
        finally:
            other.close()


for name, failure in results:
    print("%-55s %s" % (name, "ok" if failure is None else "FAILED"))
    if failure is not None:
        for line in failure.rstrip().splitlines():
            print("    " + line)
passed = sum(1 for _, failure in results if failure is None)
failed = len(results) - passed
print("%s: %d passed, %d failed" % (TRANSPORT, passed, failed))
client.close()
sys.exit(1 if failed else 0)
