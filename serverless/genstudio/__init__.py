"""GenStudio's hosted-workflow API (`/api/maas/...`) served on top of hosted workflows, job
control and result delivery, so that a client written for GenStudio changes only its base URL
and key: pure mapping modules (`envelope`, `token`, `mapping`) and thin endpoints (`endpoints`)."""
