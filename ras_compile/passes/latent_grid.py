"""Where does the latent become a token sequence?

Before the token axis exists, the analysis follows the latent ``[B, *axes]`` (any
order of channels, frames and spatial axes: ``[B, C, H, W]``, ``[B, C, F, H, W]``,
``[B, F, C, H, W]``, ``[B, C, L]``) through patch embedding (a patch convolution, overlapping or not, or views and permutes
that cut the image into patches) by giving every tensor dimension a tuple of
*atoms*. An atom ``(axis, stride, size)`` says "this dimension walks ``size``
steps of latent ``axis`` with step ``stride``": splitting ``H`` into patches of 2
gives the outer atom ``("s0", 2, H/2)`` and the inner atom ``("s0", 1, 2)``.

The token axis is the first dimension made of exactly the outer atoms of every
spatial axis (the patch grid, row-major in the order its atoms come: column-major tokens
list the width first). Nothing here depends on a model
class: only on shapes and on what the operators do to dimensions.

A model may also fold a grid axis into the batch axis before the patch embedding
(Latte: ``[B, C, F, H, W] -> [B * F, C, H, W]``, attention within each frame). Read
with ``tubes=True``, such an axis is a *tube axis*: a token is then one patch position
in every frame (a tube through the folded axis), and the folded axis counts with the
channels of that token. A model may instead keep the frames in the token sequence and fold
them into the batch only later (Open-Sora's STDiT: one ``[B, F * S, D]`` sequence, then
``(B F) S`` and ``(B S) F`` views): read with ``lead_tube=True``, the leading axis of a
token sequence over three or more grid axes is a tube axis kept *in* the sequence, whose
rows are then ``(frame, token)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

Atom = tuple[str, int, int]  # (axis name, stride, size)
DimAtoms = tuple[Atom, ...]


@dataclass(frozen=True)
class GridValue:
    """Atoms of every dimension of one tensor on the latent's path."""

    dims: tuple[DimAtoms, ...]


def latent_grid(shape: tuple[int, ...]) -> GridValue:
    """The latent itself: the batch axis, then one axis ``s<i>`` per latent dimension ``i + 1``.

    Which axes are channels is not assumed: a channel axis is one the patch embedding
    consumes (a convolution's input channels, a projection's features) or folds into
    the per-token feature dimension together with the inside of the patches.
    """
    names = ["b"] + [f"s{i}" for i in range(len(shape) - 1)]
    return GridValue(tuple(((name, 1, size),) if size > 1 else () for name, size in zip(names, shape)))


_fresh_counter = [0]


def fresh_atoms(size: int) -> DimAtoms:
    """A dimension the operator created (channels of a projection)."""
    _fresh_counter[0] += 1
    return ((f"f{_fresh_counter[0]}", 1, size),) if size > 1 else ()


def concatenated_atoms(size: int) -> DimAtoms:
    """A dimension the latent was concatenated along (with conditioning channels, say): no longer
    a walk over one latent axis. Named ``x<n>``: never part of a token axis, and a dimension
    holding one without the inside of a patch keeps the grid incomplete (a concatenation along
    a grid axis, extra frames say, is not mistaken for channels)."""
    _fresh_counter[0] += 1
    return ((f"x{_fresh_counter[0]}", 1, size),)


def is_batch_dim(atoms: DimAtoms) -> bool:
    """The latent's batch axis, or batch slots taken from it (``batch_part_atoms``)."""
    return len(atoms) == 1 and atoms[0][1] == 1 and (atoms[0][0] == "b" or atoms[0][0].startswith("bpart"))


def batch_part_atoms(size: int, batch_size: int) -> DimAtoms:
    """A batch dimension made of rows of the latent's batch (a slice of it, or slices concatenated):
    the batch axis again when it has the latent's batch size (its row ``i`` is then treated as sample
    ``i``), else ``bpart<n>`` slots, which no token source can have as its batch."""
    if size == batch_size:
        return (("b", 1, size),) if size > 1 else ()
    _fresh_counter[0] += 1  # (a size-1 slot keeps its atom: a bare size-1 dim would read as any other axis)
    return ((f"bpart{_fresh_counter[0]}", 1, size),)


def regroup(value: GridValue, out_shape: tuple[int, ...]) -> GridValue | None:
    """Atoms after a view/reshape/flatten to ``out_shape`` (None if not traceable)."""
    queue = [atom for dim in value.dims for atom in dim]
    out: list[DimAtoms] = []
    for size in out_shape:
        taken: list[Atom] = []
        need = size
        while need > 1:
            if not queue:
                return None
            axis, stride, atom_size = queue.pop(0)
            if atom_size <= need:
                if need % atom_size:
                    return None
                taken.append((axis, stride, atom_size))
                need //= atom_size
            else:
                if atom_size % need:
                    return None
                inner = atom_size // need
                taken.append((axis, stride * inner, need))
                queue.insert(0, (axis, stride, inner))
                need = 1
        out.append(tuple(taken))
    if queue:
        return None
    return GridValue(tuple(out))


def permute(value: GridValue, order: list[int]) -> GridValue:
    return GridValue(tuple(value.dims[i] for i in order))


def patch_conv(value: GridValue, out_shape: tuple[int, ...], kernel: list[int], stride: list[int],
               padding: list[int], dilation: list[int]) -> GridValue | None:
    """Atoms after a convolution that cuts patches: non-overlapping ones (kernel == stride, no padding),
    or overlapping ones whose output has one position per ``stride`` pixels (kernel 3, stride 2,
    padding 1): before the token source every value is computed on the full latent, so a patch that
    reads its neighbours' pixels is exact there, and token ``i`` owns the ``stride``-sized cell ``i``."""
    spatial = len(out_shape) - 2
    kernel, stride = _expand(kernel, spatial), _expand(stride, spatial)
    padding, dilation = _expand(padding, spatial), _expand(dilation, spatial)
    if any(d != 1 for d in dilation) or any(k < s for k, s in zip(kernel, stride)):
        return None
    if kernel != stride or any(padding):  # overlapping: one output position per stride cell
        spatial_axes = {atom[0] for dim in value.dims[2:] for atom in dim}
        if all(st == 1 for st in stride) or any(atom[0] in spatial_axes for atom in value.dims[1]):
            return None  # a size-keeping stem (same_size_conv), or channels holding positions inside patches
        sizes = [atoms[0][2] if len(atoms) == 1 else None for atoms in value.dims[2:2 + spatial]]
        if any(n is None or n % st or out_shape[2 + i] != n // st for i, (n, st) in enumerate(zip(sizes, stride))):
            return None
        kernel = stride
    dims: list[DimAtoms] = [value.dims[0], fresh_atoms(out_shape[1])]
    for i in range(spatial):
        atoms = value.dims[2 + i]
        if out_shape[2 + i] == 1:
            dims.append(())
            continue
        if len(atoms) != 1:
            return None
        axis, atom_stride, size = atoms[0]
        if size % kernel[i]:
            return None
        dims.append(((axis, atom_stride * kernel[i], size // kernel[i]),))
    return GridValue(tuple(dims))


def same_size_conv(value: GridValue, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> GridValue | None:
    """Atoms after a convolution that keeps the spatial size (a 3x3 stem, stride 1, 'same' padding)
    of a ``[B, C, *spatial]`` value: every output position is computed from its neighbourhood, but
    before the token source every value is computed on the full latent, so the positions keep their
    atoms (as through a GroupNorm there); the channels are new. None for any other size."""
    if len(in_shape) != len(out_shape) or tuple(in_shape[2:]) != tuple(out_shape[2:]) or in_shape[0] != out_shape[0]:
        return None
    spatial_axes = {atom[0] for dim in value.dims[2:] for atom in dim}
    if any(atom[0] in spatial_axes for atom in value.dims[1]):
        return None  # the channels hold positions inside patches (a pixel unshuffle): the conv mixes them away
    return GridValue((value.dims[0], fresh_atoms(out_shape[1]), *value.dims[2:]))


def _expand(values, n: int) -> list[int]:
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    return values * n if len(values) == 1 else values


@dataclass(frozen=True)
class TokenGrid:
    """How image tokens tile the latent: token ``i`` is patch ``i`` in row-major order over ``grid_axes``.

    ``grid_axes`` are latent dimensions (1-based, 0 is the batch) that the patches tile, in token order
    (``(2, 3)`` row-major over height and width; ``(3, 2)`` column-major); every other latent dimension
    is a channel dimension.
    """

    latent_shape: tuple[int, ...]   # the whole latent, batch included
    grid_axes: tuple[int, ...]
    patch_size: tuple[int, ...]     # patch extent per grid axis
    tube_axes: tuple[int, ...] = ()  # latent dimensions each token spans whole (tubes: folded into the batch
                                     # axis, or kept in the sequence as its leading rows)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.latent_shape[a] for a in self.grid_axes)

    @property
    def channel_axes(self) -> tuple[int, ...]:
        return tuple(a for a in range(1, len(self.latent_shape)) if a not in self.grid_axes)

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(s // p for s, p in zip(self.spatial_shape, self.patch_size))

    @property
    def num_tokens(self) -> int:
        return prod(self.grid_shape)


def _is_outer(atom: Atom, extents: tuple[int, ...]) -> bool:
    axis, stride, size = atom
    return axis.startswith("s") and stride * size == extents[int(axis[1:])]


def find_token_dim(value: GridValue, latent_shape: tuple[int, ...],
                   tubes: bool = False, lead_tube: bool = False) -> tuple[int, TokenGrid] | None:
    """The dimension holding the patch grid, if this tensor has one.

    A candidate is made only of the outermost atoms of distinct latent axes, in any order
    (row-major tokens, or column-major ones: the grid's axes are then listed in token order). Every other dimension holding the outermost atom of some axis must be a
    per-token feature dimension, i.e. also hold the inside of a patch; otherwise that
    axis (frames kept apart, say) still tiles the image and the candidate is only part
    of the grid. With ``tubes``, such an axis may also sit in the batch dimension
    (behind the samples): it becomes a tube axis of the grid. With ``lead_tube``, the
    first axis of a candidate over three or more axes becomes a tube axis too: the
    dimension then holds ``(tube row, token)`` rows (``size // grid.num_tokens`` tube rows).
    """
    extents = tuple(latent_shape[1:])
    for dim, atoms in enumerate(value.dims):
        if not atoms or not all(_is_outer(a, extents) for a in atoms):
            continue
        axes = [int(a[0][1:]) for a in atoms]  # in token order: row-major, or e.g. column-major (w, h)
        if len(set(axes)) != len(axes) or prod(a[2] for a in atoms) <= 1 or (lead_tube and axes != sorted(axes)):
            continue
        complete, tube_axes = True, []
        for other, other_atoms in enumerate(value.dims):
            if other == dim:
                continue
            outer = [a for a in other_atoms if _is_outer(a, extents) and int(a[0][1:]) not in axes]
            outer += [a for a in other_atoms if a[0].startswith("x")]
            inner = [a for a in other_atoms if a[0].startswith("s") and not _is_outer(a, extents)]
            if outer and not inner:
                if tubes and other == _batch_holder(value, latent_shape[0]) and _tube_atoms(other_atoms, extents):
                    tube_axes += [int(a[0][1:]) + 1 for a in outer]
                    continue
                complete = False
                break
        if complete and lead_tube and len(atoms) >= 3:
            return dim, TokenGrid(tuple(latent_shape), tuple(a + 1 for a in axes[1:]), tuple(a[1] for a in atoms[1:]),
                                  tuple(sorted(tube_axes + [axes[0] + 1])))
        if complete:
            return dim, TokenGrid(tuple(latent_shape), tuple(a + 1 for a in axes), tuple(a[1] for a in atoms),
                                  tuple(sorted(tube_axes)))
    return None


def _batch_holder(value: GridValue, batch_size: int) -> int | None:
    """The dimension holding the samples: the one whose first atom is the batch axis (dimension 0
    for a batch of one, whose size-1 batch axis has no atom)."""
    for dim, atoms in enumerate(value.dims):
        if atoms and atoms[0] == ("b", 1, batch_size):
            return dim
    return 0 if batch_size == 1 else None


def _tube_atoms(atoms: DimAtoms, extents: tuple[int, ...]) -> bool:
    """Atoms of a batch dimension with grid axes folded in behind the samples: the batch
    atom (if any) first, then whole latent axes only."""
    rest = atoms[1:] if atoms and atoms[0][0] == "b" else atoms
    return bool(rest) and all(_is_outer(a, extents) for a in rest)


def find_batch_dim(value: GridValue, grid: TokenGrid) -> tuple[int, int] | None:
    """``(dim, group)``: the dimension of the samples, and how many consecutive rows of it one
    sample owns (1, or the size of the grid's tube axes folded in behind the samples)."""
    tubes = {f"s{a - 1}" for a in grid.tube_axes}
    for dim, atoms in enumerate(value.dims):
        if atoms and atoms[0] == ("b", 1, grid.latent_shape[0]) and all(a[0] in tubes for a in atoms[1:]):
            return dim, prod(a[2] for a in atoms[1:])
    return None
