"""One module per check, each with ID, TITLE and run(ctx) -> CheckResult | list[CheckResult]; see verify.registry."""
