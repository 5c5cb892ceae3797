"""Memory-aware scheduling: order kernels so fewer bytes are live at once.

What it does: list scheduling over the kernel DAG. Among the kernels whose
inputs are ready, it runs the one that adds the fewest live bytes (bytes its
temporary and program outputs allocate minus bytes of inputs it is the last
reader of; an output, a gradient say, stays alive to the end once made),
ties broken by the fusion order; a kernel of checkpoint recomputation copies
runs only when a kernel reading it is picked, just before it
(``planning/lazy.py``). That is the greedy "least peak memory
first" heuristic of Inductor's memory-aware reordering (and of Pisarchyk &
Lee's scheduling for inference). Fusion decided what runs together; this
pass only reorders whole kernels, so no fusion is undone.

Updates in place (``Program.updates``: an output that is the next value of
an input, as a training step's new parameters are) add write-after-read
edges: every kernel reading the old value runs before the kernel writing the
new one, so that buffer_reuse can write it over the input (XLA's buffer
donation needs the same order). An edge that would close a cycle is left
out, and that update then stays out of place.

Collectives (``planning/collectives.py``): a functional collective is an
issue kernel and a ``wait_tensor`` kernel. Each issue runs as soon as it is
ready (and the kernel that fills its buffer is preferred among the ready
ones), each wait only when nothing else is ready, so the compute between
them overlaps the communication (as Inductor's comm reordering and
SimpleFSDP's bucketed overlap do). Issues keep one order,
``collectives.issue_order`` (the program's, with FSDP2's reduce-scatters
moved ahead of later units' re-gathers, as FSDP2 issues them): every rank
must issue the same collectives in the same order, or the collectives mix
up or hang. An FSDP2 reduce-scatter's wait runs as soon as it is all the
next reduce-scatter waits for (``_blocked_issues``), not last. Issues and
waits are never lazy; the kernels preparing an FSDP2 gather's input are
(run just before the issue). The pass
then builds four orders -- communication first (the greedy above, or the
incoming order under the same rules), memory first, and the incoming order
itself -- and keeps, of those hiding the most communication
(``comm_timeline.predict``), the one of the lowest ``held_peak`` (which,
unlike ``peak_live_bytes``, holds a collective's input until its wait, as
buffer_reuse does); its stats add ``communication``, the predicted timeline
of ``comm_timeline.predict``.

Fusions that raise the peak are reported, not undone: ``peak_held_by_fusion``
lists the outputs of fused kernels that are alive at the peak although
nothing reads them until after it (a separate kernel, run later, would not
hold them there).

Assumes kernels in a valid topological order (fusion's). Guarantees another
valid topological order; its stats give the peak of live temporary bytes
before and after.

Requires: kernels in a valid topological order (fusion's).
Ensures: another valid topological order, with a peak of live temporary bytes
  no higher (with collectives: the most overlapping order of the lowest
  ``held_peak``), and collective issues in their incoming order.
"""

from __future__ import annotations

from itertools import pairwise

from retrograd.ir import PassResult, Program
from retrograd.passes.planning import collectives, comm_timeline, lazy
from retrograd.passes.planning.lifetimes import lifetimes, live_peak, storage_owners

__all__ = ["held_peak", "peak_live_bytes", "run"]


def _producers(program: Program) -> dict[str, int]:
    return {name: index for index, kernel in enumerate(program.kernels)
            for name in kernel.outputs}


def _descendants(start: int, consumers: dict[int, list[int]]) -> set[int]:
    seen, stack = set(), [start]
    while stack:
        for nxt in consumers.get(stack.pop(), []):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _add_write_after_read(program: Program, producer: dict[str, int],
                          waiting: list[set[int]], consumers: dict[int, list[int]]) -> None:
    """Make the writer of each update wait for the readers of the old value,
    one update at a time against the graph so far, so no edge closes a cycle."""
    for output, source in program.updates.items():
        writer = producer.get(output)
        if writer is None:
            continue
        after = _descendants(writer, consumers)
        for index, kernel in enumerate(program.kernels):
            if index != writer and index not in after and index not in waiting[writer] \
                    and any(program.root(n) == source for n in kernel.inputs):
                waiting[writer].add(index)
                consumers.setdefault(index, []).append(writer)


def _live_sets(program: Program) -> list[dict[str, int]]:
    """Temporaries (name -> bytes) produced so far and still to be read, at
    each kernel (views count as their base)."""
    readers: dict[str, int] = {}
    for index, kernel in enumerate(program.kernels):
        for name in kernel.inputs:
            readers[program.root(name)] = index
    live: dict[str, int] = {}
    sets = []
    for index, kernel in enumerate(program.kernels):
        for name in kernel.outputs:
            buffer = program.buffers[name]
            if buffer.role == "temporary":
                live[name] = buffer.nbytes
        sets.append(dict(live))
        for name in [n for n in live if readers.get(n, -1) <= index]:
            del live[name]
    return sets


def peak_live_bytes(program: Program) -> int:
    """Peak over the schedule of bytes held by temporaries produced so far and
    still to be read (views count as their base)."""
    return max((sum(live.values()) for live in _live_sets(program)), default=0)


def held_peak(program: Program) -> int:
    """Peak of bytes the program holds at once, with the lifetimes
    buffer_reuse uses (``planning.lifetimes``: a collective's input
    until its wait, a view's base until the view's last reader): each
    temporary from its kernel to its last use, each output that is not an
    update from its kernel to the end. A ``wait_tensor``'s result is its
    collective's tensor, counted once (``lifetimes.storage_owners``, the
    rule the arena windows use). ``peak_live_bytes`` misses the holds until
    the waits, which decide between orders of a program with collectives."""
    spans = lifetimes(program)
    owner = storage_owners(program)
    lives: dict[str, tuple[int, int]] = {}
    for name, buffer in program.buffers.items():
        output = buffer.role == "output" and name not in program.updates
        if (buffer.role != "temporary" and not output) or spans.get(name, (-1,))[0] < 0:
            continue
        first, last = spans[name]
        last = len(program.kernels) if output else last
        root = owner.get(name, name)
        known = lives.get(root, (first, last))
        lives[root] = (min(known[0], first), max(known[1], last))
    return live_peak((first, last, program.buffers[root].nbytes)
                     for root, (first, last) in lives.items())


def held_by_fusion(program: Program) -> list[dict]:
    """Buffers alive at the peak only because a fused kernel made them early.

    A fused kernel writes all its outputs at once; an output nobody reads
    until after the peak is held across it, where a kernel of its own, run
    just before its first reader, would not be. Reported (not undone), with
    the bytes a split could save at most.
    """
    sets = _live_sets(program)
    if not sets:
        return []
    peak = max(range(len(sets)), key=lambda i: sum(sets[i].values()))
    producer = _producers(program)
    first_read: dict[str, int] = {}
    for index, kernel in enumerate(program.kernels):
        for name in kernel.inputs:
            first_read.setdefault(program.root(name), index)
    found = []
    for name, nbytes in sorted(sets[peak].items()):
        kernel = program.kernels[producer[name]]
        if len(kernel.nodes) > 1 and producer[name] < peak < first_read.get(name, -1):
            found.append({"kernel": kernel.name, "buffer": name, "bytes": nbytes})
    return found


def _order(program: Program, demand: lazy.Demand, rank,
           blocks: dict[int, list[int]] | None = None) -> list[int]:
    """List scheduling: among the kernels whose producers have run (lazy ones
    excepted: ``planning/lazy.py``), the least ``rank(indices, users,
    urgent)`` runs next, ``indices`` being the lazy kernels it reads not run
    yet, then it; ``urgent`` says that it is the last thing one of its
    ``blocks`` (a wait's blocked issues: ``_blocked_issues``) waits for."""
    blocks = blocks or {}
    kernels = program.kernels
    users: dict[str, set[int]] = {}
    for index, kernel in enumerate(kernels):
        for name in kernel.inputs:
            users.setdefault(program.root(name), set()).add(index)
    pending = [len(needs) for needs in demand.needs]
    ready = [i for i in range(len(kernels)) if not pending[i] and i not in demand.lazy]
    order: list[int] = []
    done: set[int] = set()
    while ready:
        chosen = min(ready, key=lambda i: rank(
            demand.pending(i, done), users, any(pending[c] == 1 for c in blocks.get(i, ()))))
        ready.remove(chosen)
        for index in demand.pending(chosen, done):
            order.append(index)
            done.add(index)
            for name in {program.root(n) for n in kernels[index].inputs}:
                users.get(name, set()).discard(index)
        for consumer in demand.needed_by.get(chosen, []):
            pending[consumer] -= 1
            if not pending[consumer] and consumer not in demand.lazy:
                ready.append(consumer)
    order += [i for i in demand.order if i not in done]   # lazy kernels nothing reads
    if len(order) != len(kernels):
        raise RuntimeError("schedule: the kernel graph has a cycle")
    return order


def _delta(program: Program, index: int, users: dict[str, set[int]]) -> int:
    """Bytes running ``index`` adds: temporaries and program outputs it writes
    less temporaries it reads last. An output lives from its kernel to the
    end (a backward's gradients), so made early it is held across every later
    peak; an update written over its input (``Program.updates``) adds nothing."""
    kernel = program.kernels[index]
    grow = sum(program.buffers[n].nbytes for n in kernel.outputs
               if program.buffers[n].role == "temporary"
               or program.buffers[n].role == "output" and n not in program.updates)
    shrink = sum(program.buffers[root].nbytes
                 for root in {program.root(n) for n in kernel.inputs}
                 if root in program.buffers and program.buffers[root].role == "temporary"
                 and users.get(root) == {index})
    return grow - shrink


def _chain_issues(program: Program, waiting: list[set[int]],
                  consumers: dict[int, list[int]]) -> dict[int, int]:
    """Each collective issue after the one before it in
    ``collectives.issue_order`` (the program's order where that order would
    close a cycle), and FSDP2's bounds (``collectives.bound_gathers``);
    returns each kernel's class (0 an issue or a kernel feeding one, 2 a
    wait, else 1) and the kernels preparing a gather's input."""
    for issues in (collectives.issue_order(program),
                   [i for i, kernel in enumerate(program.kernels)
                    if collectives.is_issue(kernel)]):
        trial = [set(producers) for producers in waiting]
        linked = {index: list(users) for index, users in consumers.items()}
        feeders = _chain(program, issues, trial, linked)
        try:
            lazy.topological(trial)
        except RuntimeError:   # the FSDP2 order against a data dependency
            continue
        waiting[:] = trial
        consumers.clear()
        consumers.update(linked)
        break
    classes = {i: 2 for i, kernel in enumerate(program.kernels) if collectives.is_wait(kernel)}
    for issue in issues:
        classes[issue] = 0
        classes.update({i: 0 for i in waiting[issue] if i not in classes})
    return classes, feeders


def _chain(program: Program, issues: list[int], waiting: list[set[int]],
           consumers: dict[int, list[int]]) -> set[int]:
    """Adds the edges of ``_chain_issues``; returns the gathers' feeders."""
    for before, after in pairwise(issues):
        if before not in waiting[after]:
            waiting[after].add(before)
            consumers.setdefault(before, []).append(after)
    return {i for i in collectives.bound_gathers(program, waiting, consumers)   # FSDP2
            if not collectives.is_issue(program.kernels[i])}   # an issue feeds the next


def _blocked_issues(program: Program, waiting: list[set[int]]) -> dict[int, list[int]]:
    """Each FSDP2 reduce-scatter's wait -> the reduce-scatter issued after it
    (one in flight: ``collectives.bound_gathers``). The communication-first
    orders run such a wait as soon as it is all that the next reduce-scatter
    waits for (as FSDP2 waits in the next unit's post-backward), not when
    nothing else is ready: placed last, it held every later unit's full
    gradients (its input, and theirs queued behind it) to the backward's
    end. A gather's wait stays late: run as soon as the next unit's gather
    was otherwise ready, it pulled each re-gather ahead of the compute
    before its unit's backward (two units' parameters alive at once)."""
    found: dict[int, list[int]] = {}
    for index, kernel in enumerate(program.kernels):
        if collectives.is_issue(kernel) and collectives.reduced_unit(kernel) is not None:
            for before in waiting[index]:
                if collectives.is_wait(program.kernels[before]):
                    found.setdefault(before, []).append(index)
    return found


def _reorder(program: Program, waiting, consumers) -> list[int]:
    """The order of the kernels: memory first, or, with collectives, the
    best of the candidate orders (``_choose``; module docstring)."""
    classes, feeders = _chain_issues(program, waiting, consumers)
    order = lazy.topological(waiting)
    # a collective issue and its wait run when the class rule says, never
    # lazily (FSDP2's re-gather is a recomputation: planning/collectives.py):
    # a lazy wait was pulled by the next unit's issue (the prefetch bound
    # makes it wait for it), so two units' re-gathers were alive at once. The
    # kernels preparing a gather's input are lazy: run just before the issue,
    # not at the program's start, where they held every unit's flat shards.
    eager = {i for i, kind in classes.items() if kind in (0, 2)} - feeders
    demand = lazy.Demand(waiting, (lazy.lazy_kernels(program) | feeders) - eager, order)
    memory = _order(program, demand, lambda indices, users, _: (
        sum(_delta(program, i, users) for i in indices), indices[-1]))
    if not classes:
        return memory
    blocks = _blocked_issues(program, waiting)
    first = _order(program, demand, lambda indices, users, urgent: (
        0 if urgent else classes.get(indices[-1], 1),
        sum(_delta(program, i, users) for i in indices), indices[-1]), blocks)
    incoming = _order(program, demand, lambda indices, users, urgent: (
        0 if urgent else classes.get(indices[-1], 1), indices[-1]), blocks)
    traced = list(range(len(program.kernels)))
    valid = all(before < index for index in traced for before in waiting[index])
    return _choose(program, [first, incoming, memory] + ([traced] if valid else []))


def _choose(program: Program, orders: list[list[int]]) -> list[int]:
    """Of ``orders`` (the communication-first ones first), those that hide
    the most communication (``comm_timeline.predict``'s exposed seconds, the
    least, within a part in a million); among them the one of the lowest
    ``held_peak``, the earlier on a tie. Where the timeline cannot be
    predicted (no process group), the communication-first ones only."""
    kernels = program.kernels
    scored = []
    for position, order in enumerate(orders):
        program.kernels = [kernels[i] for i in order]
        try:
            timeline = comm_timeline.predict(program) or {}
            scored.append((timeline.get("exposed_seconds"), held_peak(program), position))
        finally:
            program.kernels = kernels
    if any(exposed is None for exposed, _, _ in scored):
        scored = scored[:2]
    else:
        least = min(exposed for exposed, _, _ in scored)
        scored = [row for row in scored if row[0] <= least * (1 + 1e-6)]
    return orders[min(scored, key=lambda row: row[1:])[2]]


def run(program: Program, ctx) -> PassResult:
    before = peak_live_bytes(program)
    kernels = program.kernels
    producer = _producers(program)
    waiting = [{producer[n] for n in k.inputs if n in producer and producer[n] != i}
               for i, k in enumerate(kernels)]
    consumers: dict[int, list[int]] = {}
    for index, producers in enumerate(waiting):
        for producer_index in producers:
            consumers.setdefault(producer_index, []).append(index)
    _add_write_after_read(program, producer, waiting, consumers)
    order = _reorder(program, waiting, consumers)
    program.kernels = [kernels[i] for i in order]
    after = peak_live_bytes(program)
    communicates = any(collectives.is_issue(kernel) for kernel in kernels)
    if after > before and not communicates:   # memory: the greedy can lose; never worse
        program.kernels = kernels
        order, after = list(range(len(kernels))), before
    held = held_by_fusion(program)
    if held:
        ctx.log.info("%s: fusion holds %d bytes across the peak: %s", ctx.graph_name,
                     sum(h["bytes"] for h in held),
                     ", ".join(f"{h['buffer']} ({h['kernel']})" for h in held))
    stats = {
        "peak_live_bytes_before": before, "peak_live_bytes_after": after,
        "moved_kernels": sum(1 for position, i in enumerate(order) if position != i)
        if after < before or communicates else 0,
        "peak_held_by_fusion_bytes": sum(h["bytes"] for h in held),
        "peak_held_by_fusion": held}
    if communicates:
        stats["communication"] = comm_timeline.predict(program)
    return PassResult(program, stats)
