"""Device-map planning over an abstract module tree: pure Python, no torch.

The tree comes from a real ``nn.Module`` (:mod:`shardkit.bigmodel.measure`) or from checkpoint tensor names alone
(``shardkit plan``). The greedy walk is accelerate's ``infer_auto_device_map``: fill devices in order (GPUs, then
``"cpu"``, then ``"disk"``), never go back, split a module that does not fit into its direct tensors and children
unless its class is no-split, place tied parameters together. What it reserves differs (see :func:`plan`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import UsageError
from ..units import parse_size
from .readahead import CHUNK, DEPTH, PARALLEL_DEPTH, PARALLEL_PIECE, disk_ring

#: GPU staging slabs the dispatcher keeps for streaming offloaded blocks: one computing, one being filled.
STAGING_SLOTS = 2
#: Staging slabs when the CPU runs the model: one; disk blocks are read straight into it, synchronously.
CPU_STAGING_SLOTS = 1


@dataclass
class Node:
    """A module (``cls`` is its class name) or a tensor (``cls`` is None) at dotted ``name``.

    ``children`` is the order a split puts things in the queue: direct parameters, child modules, direct buffers.
    """

    name: str
    cls: str | None
    children: list[Node] = field(default_factory=list)

    @property
    def is_module(self) -> bool:
        return self.cls is not None

    def modules(self):
        """Every module node of the subtree, self first (depth-first, in child order)."""
        if self.is_module:
            yield self
            for child in self.children:
                yield from child.modules()


def normalize_max_memory(max_memory: dict) -> dict:
    """``{0: "20GiB", "cpu": "64GB"}`` -> ``{0: int, "cpu": int}`` ordered GPUs (ascending), ``"cpu"``, ``"disk"``.

    Accepts ``"cuda:N"`` and ``"N"`` for GPU ``N``. Raises :class:`UsageError` for other keys and bad sizes.
    """
    gpus, others = {}, {}
    for key, value in max_memory.items():
        size = value if isinstance(value, (int, float)) and not isinstance(value, bool) else parse_size(value)
        device = _device_key(key)
        (gpus if isinstance(device, int) else others)[device] = size
    ordered = {k: gpus[k] for k in sorted(gpus)}
    ordered.update({k: others[k] for k in ("cpu", "disk") if k in others})
    return ordered


def _device_key(key):
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key
    text = str(key).strip().lower()
    if text.startswith("cuda:"):
        text = text[5:]
    if text.isdigit():
        return int(text)
    if text in ("cpu", "disk"):
        return text
    raise UsageError(f"unknown device {key!r} in max_memory: use GPU indexes (0, 1...), 'cpu' and 'disk'")


def max_layer_size(
    queue: list[Node], sizes: dict[str, int], no_split: set[str], spanning: set[str] | None = None
) -> tuple[int, list[str]]:
    """The largest layer in ``queue`` (a module with no child modules, or a no-split one) and every name that size.

    With ``spanning`` (see :func:`spanning_modules`) a layer is what the dispatcher streams as one block: also any
    module that spans no repeated layers.
    """
    best, names = 0, []
    stack = [n for n in queue if n.is_module]
    while stack:
        node = stack.pop(0)
        kids = [c for c in node.children if c.is_module]
        if not kids or node.cls in no_split or (spanning is not None and node.name not in spanning):
            size = sizes.get(node.name, 0)
            if size > best:
                best, names = size, [node.name]
            elif size == best:
                names.append(node.name)
        else:
            stack = kids + stack
    return best, names


def _inside(name: str, tensor: str) -> bool:
    return tensor == name or tensor.startswith(name + ".") if name else True


def greedy(
    root: Node,
    sizes: dict[str, int],
    max_memory: dict,
    no_split: set[str],
    tied: list[list[str]],
    reserve: dict,
    verbose: bool = False,
    fallback: bool = False,
    report: dict | None = None,
    spanning: set[str] | None = None,
) -> dict:
    """One greedy pass. ``reserve[device] = k`` holds back ``k`` times the largest remaining layer on ``device``
    (``k`` may also be a function of that size, returning bytes). ``spanning``: see :func:`max_layer_size`.

    ``fallback`` is accelerate's ``fallback_allocation``: before leaving a GPU or the CPU with nothing on it, put
    there the first module (breadth first, splitting where allowed) that fits beside the held-back room.
    ``report`` receives ``{device: bytes}``, the least each device left empty would have needed.
    """
    devices = list(max_memory) + ([] if "disk" in max_memory else ["disk"])
    queue = list(root.children)
    device_map: dict = {}
    used = {d: 0 for d in devices}
    current = 0
    biggest, biggest_names = max_layer_size(queue, sizes, no_split, spanning)
    while queue:
        node = queue.pop(0)
        name = node.name
        biggest_names = [n for n in biggest_names if not _inside(name, n)]
        if not biggest_names:
            biggest, biggest_names = max_layer_size(queue, sizes, no_split, spanning)
        size = sizes.get(name, 0)
        groups = [g for g in tied if any(_inside(name, p) for p in g) and not all(_inside(name, p) for p in g)]
        outside = [p for g in groups for p in g if not _inside(name, p)]
        device = devices[current]
        limit = None if device == "disk" else max_memory[device]
        held = _held(reserve.get(device, 0), biggest) if limit is not None else 0
        if limit is not None:
            limit -= held
        # Tied parameters outside this module drag their queued modules along.
        with_ties, tied_nodes = size, []
        for param in outside:
            owner = next((n for n in queue if param == n.name or param.startswith(n.name + ".")), None)
            if owner is None or owner in tied_nodes:
                continue
            tied_nodes.append(owner)
            with_ties += sizes.get(owner.name, 0) - sizes.get(param, 0)
        if limit is None or used[device] + with_ties <= limit:
            if verbose:
                print(
                    f"put {name} ({size} bytes{', with ' + str([t.name for t in tied_nodes]) if tied_nodes else ''}) on {device}"
                )
            used[device] += with_ties
            device_map[name] = device
            for owner in tied_nodes:
                queue.remove(owner)
                device_map[owner.name] = device
            continue
        if tied_nodes and used[device] + size <= limit:
            split = next((t for t in tied_nodes if any(c.is_module for c in t.children) and t.cls not in no_split), None)
            if split is not None:
                at = queue.index(split)
                queue = [node] + queue[:at] + split.children + queue[at + 1 :]
                biggest, biggest_names = max_layer_size(queue, sizes, no_split, spanning)
                continue
        if used[device] + size >= limit:
            if node.is_module and any(c.is_module for c in node.children) and node.cls not in no_split:
                if verbose:
                    print(f"split {name}: {size} bytes do not fit the {limit - used[device]} left on {device}")
                queue = node.children + queue
                biggest, biggest_names = max_layer_size(queue, sizes, no_split, spanning)
                continue
        if fallback and used[device] == 0 and limit is not None:
            found = _fallback(queue, sizes, max_memory[device] - max(held, with_ties), no_split, tied)
            if found is not None:
                queue = [found[0], node] + found[1]
                continue
        if used[device] == 0 and limit is not None and report is not None:
            report[device] = with_ties + held
        if verbose:
            print(f"{device} is full ({used[device]} used, {held} held back); moving on")
        used[device] += held
        current += 1
        queue.insert(0, node)
    return device_map


def _size_with_ties(node: Node, sizes: dict[str, int], tied: list[list[str]], queue: list[Node]) -> int:
    """``node``'s size plus that of the queued modules holding parameters tied to one of its own."""
    total, owners = sizes.get(node.name, 0), []
    for group in tied:
        if any(_inside(node.name, p) for p in group) and not all(_inside(node.name, p) for p in group):
            for param in (p for p in group if not _inside(node.name, p)):
                owner = next((n for n in queue if _inside(n.name, param)), None)
                if owner is not None and owner is not node and owner not in owners:
                    owners.append(owner)
                    total += sizes.get(owner.name, 0) - sizes.get(param, 0)
    return total


def _fallback(queue: list[Node], sizes, room: int, no_split: set[str], tied) -> tuple[Node, list[Node]] | None:
    """The first node, breadth first through ``queue`` (splitting modules that may be split), whose size with its
    ties fits ``room``, and the queue without it (its queued ancestors replaced by their children); or None."""
    search = list(queue)
    found = None
    while search:
        node = search.pop(0)
        if _size_with_ties(node, sizes, tied, search) <= room:
            found = node
            break
        if node.is_module and any(c.is_module for c in node.children) and node.cls not in no_split:
            search = search + node.children
    if found is None:
        return None
    rest = list(queue)
    parts = found.name.split(".")
    for depth in range(1, len(parts)):
        parent = ".".join(parts[:depth])
        at = next((i for i, n in enumerate(rest) if n.name == parent), None)
        if at is not None:
            rest[at : at + 1] = rest[at].children
    return found, [n for n in rest if n is not found]


def plan(
    root: Node,
    sizes: dict[str, int],
    max_memory: dict,
    no_split: set[str],
    tied: list[list[str]],
    *,
    match_accelerate: bool = False,
    clean: bool = True,
    verbose: bool = False,
    fallback: bool = False,
    report: dict | None = None,
) -> dict:
    """A device map for ``root`` within ``max_memory`` (normalized, see :func:`normalize_max_memory`).

    Offloaded blocks (on ``"cpu"`` when there is a GPU, and on ``"disk"``) run on the main device (the first GPU,
    else the CPU), one block at a time. So room for them is held back only when something is actually
    offloaded, and it is what the dispatcher uses: first a pass with no reserve; if it offloads, a pass holding
    :data:`STAGING_SLOTS` slabs of the largest block on the main GPU (with the CPU as main device,
    :data:`CPU_STAGING_SLOTS`: disk blocks are read straight into it); if a GPU run also uses the disk, a pass
    also holding the disk tier's fixed pinned read ring (:func:`~shardkit.bigmodel.readahead.disk_ring`) on the
    CPU. A first GPU left with nothing but staging room is dropped, and the next one becomes the main device.

    A block is what the dispatcher streams as one: a no-split module, or a module that spans no repeated layers
    (:func:`spanning_modules`). Offloaded entries are never collapsed above that (``{"": "disk"}`` comes out as
    one entry per layer), so the map shows what will be streamed.

    ``match_accelerate=True`` reproduces accelerate exactly: one largest layer held back on the first GPU and the
    CPU, always, and accelerate's collapsed entries. ``fallback`` and ``report``: see :func:`greedy` (``report``
    describes the final pass).
    """
    gpus = [d for d in max_memory if d not in ("cpu", "disk")]
    main = gpus[0] if gpus else "cpu"
    position = {name: i for i, name in enumerate(_preorder(root))}
    spanning = None if match_accelerate else spanning_modules(root, no_split)
    offloaded = {"cpu", "disk"} if gpus else {"disk"}

    def run(reserve):
        if report is not None:
            report.clear()
        result = greedy(root, sizes, max_memory, no_split, tied, reserve, verbose, fallback, report, spanning)
        if clean:
            result = clean_device_map(result)
            if spanning is not None:
                result = expand_offloaded(result, root, spanning, lambda device: device in offloaded)
        return {k: result[k] for k in sorted(result, key=lambda k: position.get(k, len(position)))}

    if match_accelerate:
        return run({main: 1, "cpu": 1})
    device_map = run({})
    if not offloaded & set(device_map.values()):
        return device_map
    if not gpus:
        return run({"cpu": CPU_STAGING_SLOTS})
    device_map = run({main: STAGING_SLOTS})
    if "disk" in device_map.values():
        device_map = run({main: STAGING_SLOTS, "cpu": lambda largest: _ring_bytes(largest)})
    if main not in device_map.values():
        # The staging room was all the first GPU could hold, but offloaded blocks run on the first GPU the map
        # uses: plan again without this one, so the room is held where the slabs will be.
        rest = {device: limit for device, limit in max_memory.items() if device != main}
        needed = STAGING_SLOTS * max_layer_size(list(root.children), sizes, no_split)[0]
        device_map = plan(root, sizes, rest, no_split, tied, clean=clean, verbose=verbose, fallback=fallback, report=report)
        if report is not None:
            report[main] = needed
        return device_map
    return device_map


def _ring_bytes(largest: int) -> int:
    piece, count = disk_ring(largest)
    return piece * count


def _held(reserve: int | Callable[[int], int], biggest: int) -> int:
    return reserve(biggest) if callable(reserve) else reserve * biggest


def spanning_modules(root: Node, no_split: set[str]) -> set[str]:
    """Names of the modules the dispatcher streams as several blocks rather than one: those holding repeated layers
    (two or more child modules named by integers, as ``layers.0``, ``h.1``) at any depth, unless no-split."""
    found: set[str] = set()

    def walk(node: Node) -> bool:
        kids = [c for c in node.children if c.is_module]
        spans = False
        for child in kids:
            spans = walk(child) or spans
        spans = spans or sum(c.name.rsplit(".", 1)[-1].isdigit() for c in kids) >= 2
        if spans and node.cls not in no_split:
            found.add(node.name)
        return spans

    walk(root)
    return found


def stream_blocks(node: Node, spanning: set[str]) -> list[str]:
    """The blocks an offloaded ``node`` is streamed as: itself, or, if it spans repeated layers, its direct tensors
    (which the dispatcher keeps on the execution device) and the blocks of each child module."""
    if not node.is_module or node.name not in spanning:
        return [node.name]
    return [name for child in node.children for name in stream_blocks(child, spanning)]


def expand_offloaded(device_map: dict, root: Node, spanning: set[str], offloaded: Callable[[object], bool]) -> dict:
    """``device_map`` with every entry that is ``offloaded`` and spans repeated layers replaced, where it stands, by
    its :func:`stream_blocks` (same device). The dispatcher streams any map this way, whatever its granularity."""
    if not any(key in spanning and offloaded(device) for key, device in device_map.items()):
        return device_map
    nodes = {node.name: node for node in root.modules()}
    expanded: dict = {}
    for key, device in device_map.items():
        if key in spanning and key in nodes and offloaded(device):
            expanded.update(dict.fromkeys(stream_blocks(nodes[key], spanning), device))
        else:
            expanded[key] = device
    return expanded


def memory_needs(root: Node, sizes: dict[str, int], device_map: dict, no_split: set[str], *, rewrite: bool = False) -> dict:
    """What a load and the forwards with ``device_map`` hold in memory, in bytes, by the dispatcher's rules.

    ``{"host": {"weights", "staging", "disk_ring", "load_buffers", "run", "load", "peak"}, "gpus": {index:
    {"weights", "staging", "total"}}}``: host ``weights`` are the CPU tier; ``staging`` the slab(s) offloaded blocks
    run from when the CPU is the main device (one); ``disk_ring`` the pinned ring disk blocks reach a GPU through;
    ``load_buffers`` the read-ahead buffers a load uses (pinned 16 MiB pieces for GPU targets, 64 MiB chunks plus
    a cast buffer for casts and offload writes; none for plain CPU tensors, which are read straight into place,
    nor for disk tensors a safetensors file holds in the right dtype). GPU ``staging`` is two slabs of the largest
    offloaded block, on the main GPU. ``rewrite``: the load casts dtypes, or the checkpoint is not safetensors.
    """
    gpus = [d for d in device_map.values() if d not in ("cpu", "disk")]
    main = gpus[0] if gpus else "cpu"
    is_offloaded = (lambda d: d in ("cpu", "disk")) if gpus else (lambda d: d == "disk")
    blocks = expand_offloaded(device_map, root, spanning_modules(root, no_split), is_offloaded)
    offloaded = [sizes.get(k, 0) for k, d in blocks.items() if is_offloaded(d)]
    on_disk = [sizes.get(k, 0) for k, d in blocks.items() if d == "disk"]
    largest_tensor = max((sizes.get(n.name, 0) for n in _tensors(root)), default=0)
    host_weights = sum(sizes.get(k, 0) for k, d in device_map.items() if d == "cpu")
    staging = max(on_disk) * CPU_STAGING_SLOTS if main == "cpu" and on_disk else 0
    ring = _ring_bytes(max(on_disk)) if main != "cpu" and on_disk else 0
    load_buffers = 0
    if gpus:
        load_buffers = PARALLEL_DEPTH * min(PARALLEL_PIECE, largest_tensor)
    elif rewrite:
        load_buffers = (DEPTH + 1) * min(CHUNK, largest_tensor)  # the ring plus one cast chunk, at most
    host = {
        "weights": host_weights,
        "staging": staging,
        "disk_ring": ring,
        "load_buffers": load_buffers,
        "run": host_weights + staging + ring,
        "load": host_weights + load_buffers,
    }
    host["peak"] = max(host["run"], host["load"])
    per_gpu: dict = {}
    for key, device in device_map.items():
        if device not in ("cpu", "disk"):
            entry = per_gpu.setdefault(device, {"weights": 0, "staging": 0})
            entry["weights"] += sizes.get(key, 0)
    if main != "cpu" and offloaded:
        per_gpu[main]["staging"] = STAGING_SLOTS * max(offloaded)
    for entry in per_gpu.values():
        entry["total"] = entry["weights"] + entry["staging"]
    return {"host": host, "gpus": per_gpu}


def _tensors(node: Node):
    for child in node.children:
        if child.is_module:
            yield from _tensors(child)
        else:
            yield child


def experts_in_tree(root: Node, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, int]:
    """``{experts module: number of experts}`` for the MoE layers of a planning tree.

    An experts module is a module named ``experts`` holding packed 3-D weights (``gate_up_proj``/``up_proj``,
    whose first dimension ``shapes`` gives) or numbered per-expert children (``experts.0``, ``experts.1``...).
    """
    found: dict[str, int] = {}
    for node in root.modules():
        if node.name.rsplit(".", 1)[-1] != "experts":
            continue
        numbered = [c for c in node.children if c.is_module and c.name.rsplit(".", 1)[-1].isdigit()]
        packed = [c.name for c in node.children if not c.is_module and c.name.rsplit(".", 1)[-1] in ("gate_up_proj", "up_proj")]
        if numbered:
            found[node.name] = len(numbered)
        elif packed and shapes and len(shapes.get(packed[0], ())) == 3:
            found[node.name] = shapes[packed[0]][0]
    return found


def decode_traffic(
    device_map: dict, sizes: dict[str, int], experts: dict[str, int], top_k: int | None, main
) -> dict[str, int | None]:
    """Bytes one decode step copies to the execution device: every offloaded block whole (``dense``), and with
    routed fetch, where an offloaded experts module moves only ``top_k`` experts (``routed``; None without top_k).

    Offloaded means ``"disk"``, and ``"cpu"`` when ``main`` is a GPU.
    """
    offload = {"disk"} if main == "cpu" else {"cpu", "disk"}
    keys = list(device_map)

    def covering(name: str) -> str | None:
        return max((k for k in keys if _inside(k, name)), key=len, default=None)

    # a key's own bytes: its subtree less the subtrees of the keys directly inside it (mapped elsewhere)
    inner = {k: [j for j in keys if j != k and _inside(k, j) and covering(j.rpartition(".")[0]) == k] for k in keys}
    own = {k: sizes.get(k, 0) - sum(sizes.get(j, 0) for j in inner[k]) for k in keys}
    dense = sum(own[k] for k in keys if device_map[k] in offload)
    saved = 0
    for name, count in experts.items():
        if top_k and device_map.get(covering(name)) in offload:
            saved += sizes.get(name, 0) - sizes.get(name, 0) * min(top_k, count) // count
    return {"dense": dense, "routed": dense - saved if top_k else None}


def plan_experts(root: Node, sizes: dict[str, int], max_memory: dict, experts: list[str]) -> dict:
    """A map that keeps everything but the routed experts on the main device and offloads experts first.

    Mixture-of-experts models hold almost all their bytes in routed experts, of which a token uses a few: with
    routed fetch (:mod:`shardkit.bigmodel.experts`) an offloaded experts block costs only the chosen experts'
    bytes, while any other offloaded layer costs all of its own. So the non-expert weights (attention, routers,
    shared experts, norms, embeddings) all go on the main device (the first GPU, else the CPU); the experts
    modules, in layer order, fill what is left of the GPUs (like llama.cpp's ``--n-cpu-moe``), then the CPU,
    then the disk. When any experts are offloaded the main device holds :data:`STAGING_SLOTS` slabs of the
    largest experts block (a long prefill stages blocks whole); when any go to disk, the CPU holds as many read
    buffers. Raises :class:`UsageError` when the non-expert weights alone do not fit the main device.
    """
    gpus = [d for d in max_memory if d not in ("cpu", "disk")]
    main = gpus[0] if gpus else "cpu"
    order = {name: i for i, name in enumerate(_preorder(root))}
    ordered = sorted(experts, key=lambda name: order.get(name, len(order)))
    expert_bytes = sum(sizes.get(e, 0) for e in ordered)
    rest = sizes.get(root.name, 0) - expert_bytes
    if rest > max_memory.get(main, 0):
        raise UsageError(
            f"the weights other than routed experts take {rest} bytes, more than the {max_memory.get(main, 0)} "
            f"max_memory gives {main}: give it more, or plan without experts_offload"
        )
    if not ordered or rest + expert_bytes <= max_memory[main]:
        return {"": main}
    largest = max(sizes.get(e, 0) for e in ordered)
    tiers = [*gpus, "cpu"] if gpus else ["cpu"]
    free = {d: max_memory.get(d, 0) for d in tiers}
    free[main] -= rest + (STAGING_SLOTS * largest if gpus else 0)

    def fill(free: dict) -> dict:
        placed, current = {}, 0
        for name in ordered:  # in layer order: the first layers' experts stay on the GPU, the last go furthest
            size = sizes.get(name, 0)
            while current < len(tiers) and free[tiers[current]] < size:
                current += 1
            placed[name] = tiers[current] if current < len(tiers) else "disk"
            if current < len(tiers):
                free[tiers[current]] -= size
        return placed

    placed = fill(dict(free))
    if "disk" in placed.values() and "cpu" in free:
        # Disk blocks pass through host buffers (read buffers for a GPU, staging slabs for the CPU): hold them.
        free["cpu"] -= STAGING_SLOTS * largest
        placed = fill(free)
    return {"": main, **placed}


def _preorder(node: Node):
    yield node.name
    for child in node.children:
        yield from _preorder(child)


def clean_device_map(device_map: dict, module: str = "") -> dict:
    """Collapse every subtree whose entries all name one device into a single entry (in place; returned)."""
    prefix = f"{module}." if module else ""
    keys = [k for k in device_map if k.startswith(prefix)]
    values = {device_map[k] for k in keys}
    if len(values) == 1 and len(keys) > 1:
        value = device_map[keys[0]]
        for k in keys:
            del device_map[k]
        device_map[module] = value
    depth = len(module.split(".")) + 1 if module else 1
    children = {".".join(k.split(".")[:depth]) for k in device_map if k.startswith(prefix) and len(k) > len(module)}
    for child in sorted(children):
        clean_device_map(device_map, child)
    return device_map


def module_leaves(sizes: dict[str, int]) -> list[str]:
    """Names in ``sizes`` that no other name extends (the finest granularity it holds)."""
    parents = {n.rsplit(".", 1)[0] for n in sizes if n and "." in n}
    return [n for n in sizes if n and n not in parents]


def balanced_memory(
    root: Node, sizes: dict[str, int], max_memory: dict, no_split: set[str], *, low_zero: bool = False, user_set: bool = True
) -> dict:
    """accelerate's ``get_balanced_memory`` on a tree: cap every GPU but the last near an equal share of the model.

    The share is ``total / n_gpus`` (``n_gpus - 1`` with ``low_zero``) plus 1.25 times the larger of the largest
    no-split block and the mean leaf-module size, so that uneven layer boundaries don't spill to the CPU.
    """
    max_memory = dict(max_memory)
    gpus = [d for d, m in max_memory.items() if isinstance(d, int) and m > 0]
    if not gpus:
        return max_memory
    if len(gpus) == 1:
        low_zero = False
        if not user_set:
            max_memory[gpus[0]] = int(max_memory[gpus[0]] * 0.9)
    total = sizes.get("", 0)
    per_gpu = total // (len(gpus) - 1 if low_zero else len(gpus))
    block = 0
    if no_split:
        classes = {m.name: m.cls for m in root.modules()}
        seen: dict[str, int] = {}
        for name, size in sizes.items():
            cls = classes.get(name)
            if name and cls in no_split and cls not in seen:
                seen[cls] = size
            if set(seen) == set(no_split):
                break
        block = max(seen.values(), default=0)
    leaves = set(module_leaves(sizes))
    modules_only = {n: s for n, s in sizes.items() if n not in leaves}
    final = module_leaves(modules_only)
    mean = int(sum(modules_only[n] for n in final) / max(len(final), 1))
    per_gpu += int(1.25 * max(block, mean))
    gpus = sorted(gpus)
    for gpu in gpus[:-1]:
        max_memory[gpu] = min(max_memory[0] if low_zero and gpu == 0 else per_gpu, max_memory[gpu])
    if low_zero:
        rest = sum(max_memory[i] for i in range(1, len(gpus)) if i in max_memory)
        max_memory[0] = min(max(0, total - rest), max_memory[0])
    return max_memory
