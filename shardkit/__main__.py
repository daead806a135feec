from shardkit.cli import main

main(prog_name="shardkit")
