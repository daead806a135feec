"""``shardkit push FOLDER REPO_ID``: validate, then publish in one commit that replaces the old layout."""

from __future__ import annotations

import click

from ..units import format_size
from . import emit_json


def push_options(command):
    """Options shared by ``push`` and ``split``/``convert --push-to``."""
    options = [
        click.option("--create-pr", is_flag=True, help="Open a pull request (refs/pr/N) instead of committing to the branch."),
        click.option("--commit-message", help="Commit title (default: what was uploaded and deleted)."),
        click.option(
            "--delete-bin",
            is_flag=True,
            help="Also delete the .bin checkpoint (pytorch_model*.bin and its index) that the safetensors files replace.",
        ),
        click.option("--create", is_flag=True, help="Create the repo if it does not exist."),
        click.option("--private", is_flag=True, default=None, help="With --create: make the new repo private."),
        click.option("--force", is_flag=True, help="Upload even if validation finds errors (printed loudly)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


#: The parameter names :func:`push_options` and ``--push-to`` add to a command.
PUSH_PARAMETERS = ("push_to", "create_pr", "commit_message", "delete_bin", "create", "private", "force")


def split_push_options(options: dict) -> dict:
    """Remove the push parameters from a command's ``options`` (the rest go to the writer); return them."""
    return {name: options.pop(name) for name in PUSH_PARAMETERS if name in options}


@click.command("push")
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("repo_id")
@click.option("--revision", help="Branch to commit to (default main); with --create-pr, the branch the PR targets.")
@click.option("--path-in-repo", default="", help="Folder of the repo to publish into (default: its root).")
@click.option(
    "--repo-type", type=click.Choice(["model", "dataset", "space"]), default="model", show_default=True, help="Hub repo type."
)
@click.option("--token", help="Hub token with write access (default: HF_TOKEN or the token saved by `hf auth login`).")
@push_options
@click.option("--commit-description", help="Commit (or pull request) description.")
@click.option("--dry-run", is_flag=True, help="List what would be added, replaced, deleted and kept; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan (and the commit) as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def push_command(
    folder,
    repo_id,
    revision,
    path_in_repo,
    repo_type,
    token,
    create_pr,
    commit_message,
    delete_bin,
    create,
    private,
    force,
    commit_description,
    dry_run,
    as_json,
    quiet,
) -> None:
    """Validate the checkpoint in FOLDER and publish it to the Hub repo REPO_ID in one commit.

    The commit adds the folder's files (those whose SHA-256 matches the repo's are skipped), deletes the repo's
    checkpoint files that the new layout no longer uses (old shards, old index, a single file the shards
    replace; with --delete-bin the .bin checkpoint too) and keeps every other file. Files are uploaded before
    the commit, so a failure leaves the repo unchanged and a rerun sends only what is missing.
    """
    run_push(
        folder,
        repo_id,
        revision=revision,
        path_in_repo=path_in_repo,
        repo_type=repo_type,
        token=token,
        create_pr=create_pr,
        commit_message=commit_message,
        commit_description=commit_description,
        delete_bin=delete_bin,
        create=create,
        private=private,
        force=force,
        dry_run=dry_run,
        as_json=as_json,
        quiet=quiet,
    )


def run_push(folder, repo_id, *, as_json: bool = False, quiet: bool = False, **options) -> None:
    """Push and print the outcome; shared by ``push`` and ``--push-to``."""
    from ..hub.publish import push

    result = push(folder, repo_id, progress=not quiet and not as_json, **options)
    warn_forced(result)
    if as_json:
        emit_json(result.to_dict())
        return
    click.echo(render(result))


def warn_forced(result) -> None:
    """With --force, every validation error again on stderr, in red, after the push."""
    plan = result.plan
    if plan.validation and plan.validation["errors"]:
        click.secho(
            f"WARNING: --force: pushing a checkpoint with {len(plan.validation['errors'])} validation error(s):",
            err=True,
            fg="red",
            bold=True,
        )
        for finding in plan.validation["errors"]:
            click.secho(f"  {finding['code']:<22} {finding['file'] or ''}: {finding['message']}", err=True, fg="red")


def render(result) -> str:
    plan = result.plan
    target = f"{plan.repo_id}@{plan.revision}" + (" (pull request)" if plan.create_pr else "")
    head = f"{'would push' if result.dry_run else 'pushed'} {plan.folder} -> {target}"
    if not plan.repo_exists:
        head += " (new repo)"
    lines = [head]
    for action in ("add", "replace", "delete", "unchanged"):
        for f in plan.by(action):
            lines.append(f"  {action:<9} {f.path:<48} {format_size(f.size):>10}")
    kept = plan.by("keep")
    if kept:
        names = ", ".join(f.path for f in kept[:5]) + (", ..." if len(kept) > 5 else "")
        lines.append(f"  keep      {len(kept)} other file(s): {names}")
    upload = f"{format_size(plan.upload_bytes)} to upload"
    commits = f"{plan.commits} commits" if plan.commits > 1 else "1 commit"
    if result.dry_run:
        lines.append(f"dry run: {upload} in {commits}; nothing was changed")
    elif result.commit_url is None:
        lines.append("nothing to do: the repo already holds these files")
    else:
        lines.append(f"{'pull request ' + result.pr_url if result.pr_url else 'commit ' + result.commit_url} ({upload})")
    return "\n".join(lines)
