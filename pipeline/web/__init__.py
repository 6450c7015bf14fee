"""The local web app (`stagepipe serve`, `doit serve`): run browser, compare view, chat. Sits above tools and run."""
