"""One module per check, each with run(ctx) -> CheckResult | list[CheckResult] (and optionally prepare(ctx));
see verify.registry."""
