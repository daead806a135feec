"""The streamer's staging order: which block goes into which slab, and when (the GPU's two-slab logic, run on CPU)."""

import pytest

torch = pytest.importorskip("torch")

from shardkit.bigmodel.hooks import Block, Streamer  # noqa: E402


def make_blocks(count: int, nbytes: int = 64) -> list[Block]:
    blocks = []
    for i in range(count):
        block = Block(f"b{i}", None, torch.device("cpu"), "cpu", nbytes=nbytes)
        block.host = torch.full((nbytes,), i + 1, dtype=torch.uint8)
        blocks.append(block)
    return blocks


class Recorder(Streamer):
    """A streamer that logs each staging and each acquire, in the order they happen."""

    def __init__(self, *args, **kwargs) -> None:
        self.log = []
        super().__init__(*args, **kwargs)

    def _stage(self, block, slot):
        self.log.append(("stage", block.name, slot))
        super()._stage(block, slot)

    def acquire(self, block):
        self.log.append(("run", block.name))
        return super().acquire(block)


def forward(streamer: Recorder, blocks: list[Block], resident_first: bool = True) -> list:
    """What a forward does: resident blocks first (their hooks call prefetch), then each offloaded block."""
    streamer.log.clear()
    if resident_first:
        streamer.prefetch()
    for block in blocks:
        slot = streamer.acquire(block)
        assert torch.equal(streamer.slabs[slot][: block.nbytes], block.host), f"{block.name} was not in its slab when it ran"
        streamer.release(block, slot)
    return streamer.log


def test_first_forward_stages_one_block_ahead_and_ends_by_staging_the_first_block_again():
    blocks = make_blocks(3)
    streamer = Recorder(torch.device("cpu"), blocks, ring=2)
    assert forward(streamer, blocks) == [
        ("run", "b0"),
        ("stage", "b0", 0),
        ("stage", "b1", 1),
        ("run", "b1"),
        ("stage", "b2", 0),
        ("run", "b2"),
        ("stage", "b0", 1),  # the next forward's first block, while this one ends
    ]


def test_resident_blocks_at_the_start_overlap_the_second_blocks_copy():
    blocks = make_blocks(3)
    streamer = Recorder(torch.device("cpu"), blocks, ring=2)
    forward(streamer, blocks)
    # b0 is staged already; the slab b2 used is idle, so b1's copy starts before the offloaded blocks do.
    assert forward(streamer, blocks) == [
        ("stage", "b1", 0),
        ("run", "b0"),
        ("run", "b1"),
        ("stage", "b2", 1),
        ("run", "b2"),
        ("stage", "b0", 0),
    ]
    assert forward(streamer, blocks)[0] == ("stage", "b1", 1)


def test_a_slab_being_read_is_never_restaged():
    blocks = make_blocks(3)
    streamer = Recorder(torch.device("cpu"), blocks, ring=2)
    forward(streamer, blocks)
    slot = streamer.acquire(blocks[0])
    streamer.log.clear()
    streamer.prefetch()  # a resident block called inside b0's forward: b1 is staged already, b0's slab is busy
    assert streamer.log == []
    streamer.release(blocks[0], slot)


def test_the_learned_order_replaces_module_order():
    blocks = make_blocks(3)
    streamer = Recorder(torch.device("cpu"), blocks, ring=2)
    order = [blocks[0], blocks[2], blocks[1]]
    forward(streamer, order)  # module order guessed wrong: b1 staged for nothing, b2 and b1 staged on demand
    forward(streamer, order)
    assert forward(streamer, order) == [
        ("stage", "b2", 1),
        ("run", "b0"),
        ("run", "b2"),
        ("stage", "b1", 0),
        ("run", "b1"),
        ("stage", "b0", 1),
    ]


def test_a_single_offloaded_block_is_staged_once():
    blocks = make_blocks(1)
    streamer = Recorder(torch.device("cpu"), blocks, ring=2)
    assert forward(streamer, blocks) == [("run", "b0"), ("stage", "b0", 0)]
    assert forward(streamer, blocks) == [("run", "b0")]


def test_a_cpu_streamer_holds_one_slab_and_stages_on_demand():
    """The CPU has nothing to overlap: one slab (item 4 of issue 11), each block staged when it runs."""
    blocks = make_blocks(3)
    streamer = Recorder(torch.device("cpu"), blocks)
    assert len(streamer.slabs) == 1
    assert forward(streamer, blocks) == [
        ("run", "b0"),
        ("stage", "b0", 0),
        ("run", "b1"),
        ("stage", "b1", 0),
        ("run", "b2"),
        ("stage", "b2", 0),
    ]
    second = forward(streamer, blocks)  # a resident block's prefetch may stage the first block early
    assert [entry for entry in second if entry[0] == "stage"] == [("stage", f"b{i}", 0) for i in range(3)]


def test_disk_pieces_cover_the_slab_exactly():
    """A GPU-run disk block is cut into ring pieces: every byte of every run lands at its slab offset."""
    import random

    from shardkit.bigmodel.readahead import split_pieces

    rng = random.Random(0)
    source = bytes(rng.randrange(256) for _ in range(5000))
    runs, at = [], 0
    for _ in range(12):
        size = rng.randrange(1, 400)
        runs.append(("f", rng.randrange(0, len(source) - size), at, size))
        at += -(-size // 256) * 256  # slab alignment: padding between tensors
    for piece in (256, 512, 1000, 10_000):
        slab, expected = bytearray(at), bytearray(at)
        for _, offset, start, size in runs:
            expected[start : start + size] = source[offset : offset + size]
        spans = split_pieces(runs, at, piece)
        for start, nbytes, reads in spans:
            assert nbytes <= piece
            buffer = bytearray(piece)
            for _, offset, inside, size in reads:
                assert inside + size <= nbytes
                buffer[inside : inside + size] = source[offset : offset + size]
            slab[start : start + nbytes] = buffer[:nbytes]
        assert slab == expected, piece
        assert len(spans) <= -(-at // piece)
