"""A Python spec: an ordinary function returning a spec object.

Python specs are for what YAML should not do (loops, arithmetic, sweeps). This one builds the
same model as ``examples/tiny/tiny-hdit-neighborhood.yaml`` with the ``hdit`` family helper;
run it to print the YAML::

    python examples/python_spec.py > my-hdit.yaml && ditkit describe my-hdit.yaml
"""

from ditkit import spec as S


def my_hdit() -> S.ModelSpec:
    spec = S.hdit(
        widths=[32, 64],
        depths=[1, 1],
        local=["neighborhood"],
        d_head=16,
        kernel_size=3,
        patch=2,
        resolution=16,
        classes=10,
        mapping_width=32,
        mapping_depth=1,
        name="tiny-hdit-neighborhood",
    )
    return spec


if __name__ == "__main__":
    print(S.dumps(my_hdit()), end="")
