"""HTTP routes, one module per resource."""

from piggyback_serve.server.routes import health, jobs, predict, registry, tasks

routers = (predict.router, jobs.router, tasks.router, registry.router, health.router)
