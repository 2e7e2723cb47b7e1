"""torchrun as the tests start it by hand, with its rendezvous store and the processes' sockets on 127.0.0.1
only (as `distill run --nproc` has them; --standalone's and c10d's stores listen on every interface):

    python local_torchrun.py PORT NODE_RANK [torchrun arguments...]

Node 0 hosts the store at PORT (0: any free port), the others join it there (torchrun's static rendezvous).
"""
import sys

from torch.distributed.run import main

from distill.launch import local_store

if __name__ == "__main__":
    port, node = int(sys.argv[1]), int(sys.argv[2])
    if node == 0:
        store, port, _ = local_store(port)  # (kept open while the processes run)
    main(["--rdzv-backend=static", "--master-addr=127.0.0.1", f"--master-port={port}", f"--node-rank={node}",
          "--max-restarts=0", *sys.argv[3:]])
