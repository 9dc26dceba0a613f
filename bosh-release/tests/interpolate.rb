#!/usr/bin/env ruby
# frozen_string_literal: true

# Applies BOSH ops files to a manifest the way `bosh interpolate` does (the subset ops files
# use: `replace` and `remove`, paths with `name=value` selectors, `?` for optional segments and
# `-` to append; after a `?` segment, missing keys are created), for tests on machines without the bosh CLI. Variables are left as ((names)).
#
# Usage: interpolate.rb MANIFEST [OPS_FILE...]   prints the result as JSON

require 'json'
require 'yaml'

class OpsError < StandardError; end

# A path segment: an index, `-` (append), `key=value` (the array element whose key matches),
# or a hash key; `?` makes it optional (created when missing on replace).
Segment = Struct.new(:text) do
  def optional?
    text.end_with?('?')
  end

  def key
    optional? ? text[0..-2] : text
  end
end

def child(node, segment, create:, path:)
  key = segment.key
  if node.is_a?(Array)
    if key == '-'
      return nil unless create

      node << {}
      return node.last
    end
    if key =~ /\A\d+\z/
      return node[key.to_i] || raise(OpsError, "#{path}: no element #{key}")
    end
    name, value = key.split('=', 2)
    raise OpsError, "#{path}: #{key} is not a selector" if value.nil?

    found = node.find { |item| item.is_a?(Hash) && item[name] == value }
    return found if found
    raise OpsError, "#{path}: no element with #{key}" unless create

    node << { name => value }
    node.last
  elsif node.is_a?(Hash)
    return node[key] if node.key?(key)
    raise OpsError, "#{path}: no key #{key}" unless create

    node[key] = {}
  else
    raise OpsError, "#{path}: cannot descend into #{node.inspect}"
  end
end

def apply(manifest, op)
  segments = op.fetch('path').split('/').drop(1).map { |s| Segment.new(s) }
  optional_seen = false
  parent = segments[0..-2].reduce(manifest) do |node, segment|
    optional_seen ||= segment.optional?
    child(node, segment, create: op['type'] == 'replace' && optional_seen, path: op['path'])
  end
  last = segments.last
  case op.fetch('type')
  when 'replace'
    if parent.is_a?(Array) && last.key == '-'
      parent << op['value']
    elsif parent.is_a?(Array) && last.key.include?('=')
      name, value = last.key.split('=', 2)
      index = parent.index { |item| item.is_a?(Hash) && item[name] == value }
      raise OpsError, "#{op['path']}: no element with #{last.key}" if index.nil? && !last.optional?

      index ? parent[index] = op['value'] : parent << op['value']
    else
      parent[last.key =~ /\A\d+\z/ && parent.is_a?(Array) ? last.key.to_i : last.key] = op['value']
    end
  when 'remove'
    if parent.is_a?(Array)
      name, value = last.key.split('=', 2)
      index = parent.index { |item| item.is_a?(Hash) && item[name] == value }
      raise OpsError, "#{op['path']}: nothing to remove" if index.nil? && !last.optional?

      parent.delete_at(index) if index
    else
      raise OpsError, "#{op['path']}: nothing to remove" unless parent.key?(last.key) || last.optional?

      parent.delete(last.key)
    end
  else
    raise OpsError, "unknown op type #{op['type']}"
  end
end

manifest_path, *ops_paths = ARGV
abort 'usage: interpolate.rb MANIFEST [OPS_FILE...]' if manifest_path.nil?
manifest = YAML.safe_load(File.read(manifest_path))
ops_paths.each do |ops_path|
  YAML.safe_load(File.read(ops_path)).each do |op|
    apply(manifest, op)
  rescue OpsError, KeyError => e
    abort "#{File.basename(ops_path)}: #{e.message}"
  end
end
puts JSON.generate(manifest)
