"""The ranks of a fit and what spans them: which device and how many CPU threads each rank
gets (``_devices``), exclusive device leases (``_leases``), process groups and the (replica x
stage) ``DeviceMesh`` (``_groups``), and the replicas' gradient sums (``_replicas``)."""
