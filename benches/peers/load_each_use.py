"""Issue-12 peer: `safetensors.torch.load_file` of the model at each use, no cache.

    python benches/peers/load_each_use.py FOLDER [--rounds 3] [--out results.txt]

The simplest Python code: every use loads the file (safetensors maps it and
copies each tensor out), computes, and drops the tensors. See common.py.
"""

from safetensors.torch import load_file

import common


def main():
    a = common.args(__doc__.splitlines()[0])
    files = common.model_files(a.folder)
    x = common.x_vector()
    run = common.Run("load_each_use")
    loads = 0
    for r in range(a.rounds):
        for m, path in enumerate(files):
            tensors = load_file(path)
            loads += 1
            run.record(r, m, common.use(tensors, x))
            del tensors
    run.finish(a.out, loads=loads)


if __name__ == "__main__":
    main()
