"""stream.protocol's syntax checks against the atproto specs' examples, and the one gap of the
SDK's patterns they close: ``$`` matches before a trailing newline, so ``"did:plc:abc\\n"`` passed."""

from stream.protocol import is_did, is_handle, is_record_key


def test_syntax_and_no_trailing_newline():
    for did in ("did:plc:z72i7hdynmk6r22z27h6tvur", "did:web:example.com", "did:web:host%3A8080"):
        assert is_did(did) and not is_did(did + "\n") and not is_did(did + '"')
    assert not is_did("did:plc:") and not is_did("not-a-did")
    for handle in ("alice.bsky.social", "xn--ls8h.test"):
        assert is_handle(handle) and not is_handle(handle + "\n")
    assert not is_handle("nodot") and not is_handle("a b.com")
    for rkey in ("3jzfcijpj2z2a", "self", "a:b~c"):
        assert is_record_key(rkey) and not is_record_key(rkey + "\n")
    assert not is_record_key(".") and not is_record_key("a/b")
