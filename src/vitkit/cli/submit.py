"""`vitkit submit --nodes N --gpus-per-node G [slurm options] -- <train arguments>`: multi-node training on Slurm."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="write (and submit) a Slurm job that trains on several machines",
        description="Write an sbatch script that runs `torchrun ... -m vitkit train <train arguments>` on every "
        "node (c10d rendezvous on the first node) and submit it with sbatch when sbatch exists; otherwise "
        "print where the script is. Example: vitkit submit --nodes 2 --gpus-per-node 8 -- --recipe deit_small",
    )
    p.add_argument("--nodes", type=int, required=True, help="machines to train on")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (training processes) per machine")
    p.add_argument(
        "--output", metavar="FILE", help="where to write the script (default: slurm/<job-name>-<date>-<time>.sbatch)"
    )
    p.add_argument("--job-name", default="vitkit")
    p.add_argument("--partition")
    p.add_argument("--time", help="time limit in Slurm's format, e.g. 2-00:00:00")
    p.add_argument("--account")
    p.add_argument("--cpus-per-task", type=int, help="CPU cores per node")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node (default 29500)")
    p.add_argument(
        "--log", default="%x-%j.out", help="Slurm's --output pattern for the job's log (default %%x-%%j.out)"
    )
    p.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run before torchrun, e.g. 'source ~/venv/bin/activate' (repeatable)",
    )
    p.add_argument(
        "--requeue",
        action="store_true",
        help="before the time limit or preemption (Slurm's SIGTERM, --signal-lead s ahead) save the run, "
        "requeue the job and resume from the run folder (needs --output DIR in the train arguments)",
    )
    p.add_argument(
        "--signal-lead",
        type=int,
        default=120,
        metavar="S",
        help="with --requeue: seconds of warning before the limit (default 120; a save takes one step "
        "plus the state.pt write, and torchrun kills 30 s after relaying the signal)",
    )
    p.add_argument("--no-submit", action="store_true", help="only write the script")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: the arguments of `vitkit train`")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vitkit.tools.slurm import SlurmJob, submit, write_script  # noqa: PLC0415  fast CLI start-up

    train_args = list(args.train_args)
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    job = SlurmJob(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        train_args=tuple(train_args),
        job_name=args.job_name,
        partition=args.partition,
        time=args.time,
        account=args.account,
        cpus_per_task=args.cpus_per_task,
        setup=tuple(args.setup),
        port=args.port,
        log=args.log,
        requeue=args.requeue,
        signal_lead=args.signal_lead,
    )
    path = write_script(job, args.output)
    print(f"wrote {path} ({job.nodes} node(s) x {job.gpus_per_node} GPU(s))")
    if args.no_submit:
        return 0
    reply = submit(path)
    if reply is None:
        print(f"sbatch not found on this machine: submit the script on the cluster with `sbatch {path}`")
    else:
        print(reply)
    return 0
