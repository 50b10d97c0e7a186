"""Stage 1: load the latent diffusion model and the image backbone, decode images, compute LaRE
maps and backbone features, and write them into a cache. Needs diffusers; stage 2 never imports it."""
