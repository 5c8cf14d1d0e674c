"""torch.compile's caches are keyed by our custom ops' source (a changed fake impl or autograd formula must not
be served a stale compiled backward: seen in session 7)."""
import torch

from int8flow.ops import _cache_tag  # importing int8flow.ops tags the caches


def test_importing_the_ops_tags_the_compile_caches_with_their_source():
    tags = torch.compiler.config.cache_key_tag.split(",")
    ours = [t for t in tags if t.startswith(_cache_tag.PREFIX)]
    assert len(ours) == 1 and len(ours[0]) == len(_cache_tag.PREFIX) + 16


def test_the_tag_follows_the_source_and_keeps_a_users_tag(monkeypatch):
    a = _cache_tag.source_tag([b"def f(): return 1\n", b"x"])
    assert a == _cache_tag.source_tag([b"def f(): return 1\n", b"x"])
    assert a != _cache_tag.source_tag([b"def f(): return 2\n", b"x"])
    assert a != _cache_tag.source_tag([b"def f(): return 1\nx"])  # file boundaries count
    monkeypatch.setattr(torch.compiler.config, "cache_key_tag", "mine," + _cache_tag.PREFIX + "0123456789abcdef")
    tag = _cache_tag.tag_compile_caches()
    assert torch.compiler.config.cache_key_tag == f"mine,{tag}"  # the user's tag kept, an older one of ours replaced
    _cache_tag.tag_compile_caches()
    assert torch.compiler.config.cache_key_tag == f"mine,{tag}"  # idempotent
