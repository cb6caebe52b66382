output "master_policy_arn" {
  description = "ARN of the master's IAM policy; attach it to the role or user the Paddock master runs as."
  value       = aws_iam_policy.master.arn
}

output "master_policy_json" {
  description = "The master's policy document, as JSON."
  value       = data.aws_iam_policy_document.master.json
}

output "worker_security_group_id" {
  description = "Worker security group; goes in a pool's `security_groups`."
  value       = aws_security_group.worker.id
}

output "worker_instance_profile_name" {
  description = "Worker instance profile; goes in a pool's `iam_instance_profile`. null when not created."
  value       = one(aws_iam_instance_profile.worker[*].name)
}

output "worker_role_name" {
  description = "Worker role, to attach policies to if builds need AWS access. null when not created."
  value       = one(aws_iam_role.worker[*].name)
}

output "launch_template_id" {
  description = "Launch template id; goes in a pool's `launch_template`. null when not created."
  value       = one(aws_launch_template.worker[*].id)
}
