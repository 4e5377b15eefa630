"""Ray Serve deployment of distilled students: the OpenAI Images route and a native route, autoscaling
replicas with dynamic batching, model sources from MLflow aliases, versions or folders."""
